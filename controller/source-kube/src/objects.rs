//! Custom resources as the engine's objects.
//!
//! Objects are read as `DynamicObject`s and their specs parsed one by one, so that one object
//! the controller cannot read (written under an older CRD, say) is reported on that object and
//! never stops the watch of the others.
//!
//! Names are the controller's, as in a watched folder: a Claim names its Pool and User, wherever
//! they are declared among the watched namespaces. An object whose kind and name another
//! namespace declared first belongs to that one; the second is reported (as a file declaring an
//! object another file declares).

use std::path::PathBuf;

use kube::api::{ApiResource, DynamicObject};
use kube::core::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::Value;

use poolkeeper_kinds::validate::validate_object;
use poolkeeper_kinds::{
    Claim, ClaimSpec, Deployment, DeploymentSpec, FieldError, Kind, Object, Origin, Pool, PoolSpec,
    Spec, User, UserSpec,
};

/// The finalizer that holds a deleted Pool, Claim or Deployment until its cleanup is done.
pub const FINALIZER: &str = "poolkeeper.dev/cleanup";
/// The label an API-made Claim carries: its user.
pub const LABEL_USER: &str = "poolkeeper.dev/user";
/// The label that marks a Claim made through the HTTP API (or a webhook), which the API may
/// release.
pub const LABEL_MADE_BY: &str = "poolkeeper.dev/made-by";

/// Where to find a kind on the API server.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Pool => ApiResource::erase::<Pool>(&()),
        Kind::Claim => ApiResource::erase::<Claim>(&()),
        Kind::User => ApiResource::erase::<User>(&()),
        Kind::Deployment => ApiResource::erase::<Deployment>(&()),
    }
}

/// Whether deleting an object of this kind waits for the controller's cleanup.
pub fn has_finalizer(kind: Kind) -> bool {
    matches!(kind, Kind::Pool | Kind::Claim | Kind::Deployment)
}

/// Where an object is declared, as the engine shows it: `NAMESPACE/Kind/NAME`.
pub fn origin(kind: Kind, namespace: &str, name: &str) -> Origin {
    Origin {
        file: PathBuf::from(format!("{namespace}/{kind}/{name}")),
        line: 0,
        col: 0,
    }
}

/// The namespace an origin made by [`origin`] names.
pub fn namespace_of(origin: &Origin) -> Option<&str> {
    origin.file.to_str()?.split('/').next()
}

/// What the source knows of one custom resource.
#[derive(Clone, Debug)]
pub struct Seen {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub resource_version: String,
    pub finalizers: Vec<String>,
    pub deleting: bool,
    /// Made through the HTTP API (it carries [`LABEL_MADE_BY`]).
    pub made_by_api: bool,
    /// `creationTimestamp`, to tell which of two namespaces declared a name first, and to hand
    /// a list's claims over in the order they were created.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    /// The object as the engine takes it, or why it cannot.
    pub object: Result<Object, Vec<FieldError>>,
}

impl Seen {
    /// Which of two objects was declared first: the older `creationTimestamp`, then the
    /// namespace and the name (an API server's timestamps count whole seconds).
    pub fn age_order(&self) -> (Option<k8s_openapi::jiff::Timestamp>, &str, &str) {
        (self.created, &self.namespace, &self.name)
    }

    pub fn reference(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        let ar = api_resource(self.kind);
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(ar.api_version),
            kind: Some(ar.kind),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            uid: Some(self.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        }
    }
}

/// Reads one custom resource of `kind`.
pub fn read(kind: Kind, obj: &DynamicObject) -> Seen {
    let meta: &ObjectMeta = obj.meta();
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let generation = meta.generation.unwrap_or(1);
    let object = parse_spec(kind, obj.data.get("spec")).and_then(|spec| {
        let errs = validate_object(&name, &spec);
        if errs.is_empty() {
            Ok(Object {
                name: name.clone(),
                spec,
                origin: origin(kind, &namespace, &name),
                generation,
            })
        } else {
            Err(errs)
        }
    });
    Seen {
        kind,
        namespace,
        name,
        uid: meta.uid.clone().unwrap_or_default(),
        generation,
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        finalizers: meta.finalizers.clone().unwrap_or_default(),
        deleting: meta.deletion_timestamp.is_some(),
        made_by_api: obj.labels().get(LABEL_MADE_BY).is_some_and(|v| v == "api"),
        created: meta.creation_timestamp.as_ref().map(|t| t.0),
        object,
    }
}

fn parse_spec(kind: Kind, spec: Option<&Value>) -> Result<Spec, Vec<FieldError>> {
    let spec = spec
        .cloned()
        .ok_or_else(|| vec![FieldError::new("spec", "the object has no spec")])?;
    let bad = |e: serde_json::Error| vec![FieldError::new("spec", e.to_string())];
    Ok(match kind {
        Kind::Pool => Spec::Pool(serde_json::from_value::<PoolSpec>(spec).map_err(bad)?),
        Kind::Claim => Spec::Claim(serde_json::from_value::<ClaimSpec>(spec).map_err(bad)?),
        Kind::User => Spec::User(serde_json::from_value::<UserSpec>(spec).map_err(bad)?),
        Kind::Deployment => {
            Spec::Deployment(serde_json::from_value::<DeploymentSpec>(spec).map_err(bad)?)
        }
    })
}

/// One line per problem, as the engine and status show them: `field: message`.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(kind: Kind, name: &str, spec: Value) -> DynamicObject {
        let mut obj = DynamicObject::new(name, &api_resource(kind)).within("team-a");
        obj.data = serde_json::json!({ "spec": spec });
        obj.metadata.generation = Some(3);
        obj
    }

    #[test]
    fn a_valid_resource_becomes_the_object_the_engine_takes() {
        let seen = read(
            Kind::Claim,
            &dynamic(
                Kind::Claim,
                "alice-web",
                serde_json::json!({"pool": "nginx", "user": "alice"}),
            ),
        );
        let obj = seen.object.expect("valid");
        assert_eq!(obj.name, "alice-web");
        assert_eq!(obj.generation, 3);
        assert_eq!(obj.origin.to_string(), "team-a/Claim/alice-web");
        assert_eq!(namespace_of(&obj.origin), Some("team-a"));
    }

    #[test]
    fn an_unreadable_or_invalid_spec_names_the_field() {
        let seen = read(
            Kind::Claim,
            &dynamic(
                Kind::Claim,
                "x",
                serde_json::json!({"pool": "p", "user": "u", "colour": 1}),
            ),
        );
        let errs = seen.object.expect_err("unknown field");
        assert!(describe(&errs).contains("colour"), "{errs:?}");
        let seen = read(
            Kind::Pool,
            &dynamic(
                Kind::Pool,
                "p",
                serde_json::json!({"template": {"image": "x", "ports": [{"name": "http", "containerPort": 80}]}, "warm": 1, "claimTTL": "soon"}),
            ),
        );
        let errs = seen.object.expect_err("bad duration");
        assert_eq!(errs[0].path, "spec.claimTTL", "{errs:?}");
    }
}
