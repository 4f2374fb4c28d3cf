//! The CustomResourceDefinitions, generated from the Rust types and then shaped for a real API
//! server:
//!
//! - integer formats are those Kubernetes knows (`int32`, `int64`) with the bounds of the Rust
//!   type as `minimum`/`maximum` (schemars writes `uint16`, `uint32`, `uint64`, which an API
//!   server accepts with a warning and ignores);
//! - what [`crate::validate`] refuses across fields and can be said in CEL is refused by the
//!   API server at admission too (`x-kubernetes-validations`), with the same message, so that
//!   `kubectl apply` of such an object fails at once;
//! - the lists and strings those rules walk have bounds (`maxItems`, `maxLength`), which the
//!   API server's cost estimate of the rules needs.
//!
//! What CEL cannot say (a `dependsOn` cycle, a quantity's syntax, references to other objects)
//! stays the controller's: such an object is admitted and gets `SpecValid=False` naming the field.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::{Map, Value, json};

use crate::{Claim, Deployment, Kind, Pool, User};

/// One CEL rule: where it sits (a dotted path from the object's root; `[]` is a list's items),
/// the rule, its message (a CEL expression when `expr`), and the field it names, relative to
/// where it sits.
struct Rule {
    kind: Kind,
    at: &'static str,
    rule: &'static str,
    message: &'static str,
    expr: bool,
    field: Option<&'static str>,
}

const fn rule(kind: Kind, at: &'static str, rule: &'static str, message: &'static str) -> Rule {
    Rule {
        kind,
        at,
        rule,
        message,
        expr: false,
        field: None,
    }
}

impl Rule {
    const fn expr(mut self) -> Rule {
        self.expr = true;
        self
    }

    const fn field(mut self, field: &'static str) -> Rule {
        self.field = Some(field);
        self
    }
}

/// A duration's total in milliseconds, as a double (no overflow however many digits), for a
/// string the duration pattern matched: `units::parse_duration`'s sum.
macro_rules! duration_ms {
    () => {
        "self.findAll('[0-9]+(ms|s|m|h|d)').map(p, double(p.substring(0, size(p) - (p.endsWith('ms') ? 2 : 1))) * (p.endsWith('ms') ? 1.0 : p.endsWith('s') ? 1000.0 : p.endsWith('m') ? 60000.0 : p.endsWith('h') ? 3600000.0 : 86400000.0)).sum()"
    };
}
/// Durations that match the pattern (the pattern's own rule speaks for the others).
macro_rules! duration_matched {
    () => {
        "!self.matches('^\\\\s*([0-9]+(ms|s|m|h|d))+\\\\s*$') || "
    };
}
const DURATION_ABOVE_ZERO: &str = concat!(duration_matched!(), duration_ms!(), " > 0.0");
const DURATION_ZERO: &str = r#"'invalid duration "%s": must be greater than zero'.format([self])"#;
/// [`crate::units::MAX_DURATION_MS`] (checked by a test).
const DURATION_AT_MOST_MAX: &str =
    concat!(duration_matched!(), duration_ms!(), " <= 3153600000000.0");
const DURATION_TOO_LARGE: &str =
    r#"'duration "%s" is too large (at most 100 years, 36500d)'.format([self])"#;

/// Whether container `c`'s longest instance name (`DEPLOYMENT-CONTAINER`, and `-N` with
/// replicas) fits in 63 characters: `validate::check_instance_names`.
macro_rules! instance_name_fits {
    () => {
        "size(c.name) > 63 || size(self.metadata.name) + 1 + size(c.name) + (has(c.replicas) && c.replicas > 1 ? 1 + size(string(c.replicas - 1)) : 0) <= 63"
    };
}

/// The rules, each the CEL form of a check of [`crate::validate`] (same message).
fn rules() -> Vec<Rule> {
    use Kind::{Claim, Deployment, Pool, User};
    let mut rules = Vec::new();
    for kind in Kind::ALL {
        rules.push(
            rule(
                kind,
                "",
                "size(self.metadata.name) <= 63",
                r#"'name "%s" is longer than 63 characters'.format([self.metadata.name])"#,
            )
            .expr(),
        );
        rules.push(
            rule(
                kind,
                "",
                "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
                r#"'name "%s" must consist of lowercase letters, digits and \'-\', and start and end with a letter or digit'.format([self.metadata.name])"#,
            )
            .expr(),
        );
    }
    rules.extend([
        // Pool
        rule(
            Pool,
            "",
            "size(self.metadata.name) <= 57 || size(self.metadata.name) > 63",
            r#"'name "%s" is longer than 57 characters (the instances of a pool are named NAME-xxxxx, at most 63)'.format([self.metadata.name])"#,
        )
        .expr(),
        rule(
            Pool,
            "",
            "!self.metadata.name.matches('^[0-9]')",
            r#"'name "%s" must start with a letter (the instances of a pool name Kubernetes Services)'.format([self.metadata.name])"#,
        )
        .expr(),
        rule(
            Pool,
            "spec",
            "!has(self.max) || !has(self.warm) || self.warm <= self.max",
            "'warm (%d) is greater than max (%d)'.format([self.warm, self.max])",
        )
        .expr()
        .field(".warm"),
        rule(
            Pool,
            "spec",
            "has(self.max) || !has(self.warm) || !has(self.hostPorts) || !has(self.template.ports) || size(self.template.ports) == 0 || self.hostPorts.end < self.hostPorts.start || self.warm <= (self.hostPorts.end - self.hostPorts.start + 1) / size(self.template.ports)",
            "'warm (%d) is greater than max (%d)'.format([self.warm, (self.hostPorts.end - self.hostPorts.start + 1) / size(self.template.ports)])",
        )
        .expr()
        .field(".warm"),
        rule(
            Pool,
            "spec.template",
            "self.image.trim() != ''",
            "image must not be empty",
        )
        .field(".image"),
        rule(
            Pool,
            "spec",
            "!has(self.claimResources) || !has(self.claimResources.cpu) || (has(self.template.resources) && has(self.template.resources.cpu))",
            "claims may change cpu only where spec.template.resources.cpu declares it",
        )
        .field(".claimResources.cpu"),
        rule(
            Pool,
            "spec",
            "!has(self.claimResources) || !has(self.claimResources.memory) || (has(self.template.resources) && has(self.template.resources.memory))",
            "claims may change memory only where spec.template.resources.memory declares it",
        )
        .field(".claimResources.memory"),
        rule(
            Pool,
            "spec.template.ports[]",
            "self.containerPort >= 1",
            "port must be between 1 and 65535",
        )
        .field(".containerPort"),
        rule(
            Pool,
            "spec.template.ports[]",
            "self.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.name) <= 63",
            r#"'name "%s" must consist of lowercase letters, digits and \'-\', and start and end with a letter or digit'.format([self.name])"#,
        )
        .expr()
        .field(".name"),
        rule(
            Pool,
            "spec.template",
            "!has(self.ports) || self.ports.all(p, self.ports.filter(q, q.name == p.name).size() == 1)",
            r#"'duplicate port name "%s"'.format([self.ports.filter(p, self.ports.filter(q, q.name == p.name).size() > 1)[0].name])"#,
        )
        .expr()
        .field(".ports"),
        rule(
            Pool,
            "spec.hostPorts",
            "self.start >= 1 && self.end >= self.start",
            "'invalid range %d-%d: need 1 <= start <= end <= 65535'.format([self.start, self.end])",
        )
        .expr(),
        rule(
            Pool,
            "spec",
            "!has(self.hostPorts) || (has(self.template.ports) && size(self.template.ports) > 0)",
            "hostPorts is set but the template declares no ports",
        )
        .field(".hostPorts"),
        rule(
            Pool,
            "spec",
            "!has(self.hostPorts) || !has(self.max) || !has(self.template.ports) || size(self.template.ports) == 0 || self.hostPorts.end < self.hostPorts.start || self.max * size(self.template.ports) <= self.hostPorts.end - self.hostPorts.start + 1",
            "'range %d-%d holds %d ports, but max (%d) instances x %d port(s) need %d'.format([self.hostPorts.start, self.hostPorts.end, self.hostPorts.end - self.hostPorts.start + 1, self.max, size(self.template.ports), self.max * size(self.template.ports)])",
        )
        .expr()
        .field(".hostPorts"),
        rule(
            Pool,
            "spec",
            "!has(self.reset) || self.reset != 'Exec' || (has(self.resetCommand) && size(self.resetCommand) > 0)",
            "reset is Exec but resetCommand is empty",
        )
        .field(".reset"),
        rule(
            Pool,
            "spec",
            "!has(self.resetCommand) || size(self.resetCommand) == 0 || (has(self.reset) && self.reset == 'Exec')",
            "resetCommand is only used with reset: Exec",
        )
        .field(".resetCommand"),
        rule(
            Pool,
            "spec.template.files",
            "self.mountPath.startsWith('/')",
            r#"'mountPath "%s" must be an absolute path'.format([self.mountPath])"#,
        )
        .expr()
        .field(".mountPath"),
        rule(
            Pool,
            "spec.claimTTL",
            "self.matches('^\\\\s*([0-9]+(ms|s|m|h|d))+\\\\s*$')",
            r#"'invalid duration "%s" (expected e.g. 90s, 30m, 1h30m)'.format([self])"#,
        )
        .expr(),
        rule(Pool, "spec.claimTTL", DURATION_ABOVE_ZERO, DURATION_ZERO).expr(),
        rule(Pool, "spec.claimTTL", DURATION_AT_MOST_MAX, DURATION_TOO_LARGE).expr(),
        rule(
            Pool,
            "spec.template.ssh",
            "self.user.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
            r#"'"%s" is not a valid user name'.format([self.user])"#,
        )
        .expr()
        .field(".user"),
        // Claim
        rule(
            Claim,
            "spec",
            "size(self.pool) > 0",
            "pool must not be empty",
        )
        .field(".pool"),
        rule(
            Claim,
            "spec",
            "size(self.user) > 0",
            "user must not be empty",
        )
        .field(".user"),
        rule(
            Claim,
            "spec.ttl",
            "self.matches('^\\\\s*([0-9]+(ms|s|m|h|d))+\\\\s*$')",
            r#"'invalid duration "%s" (expected e.g. 90s, 30m, 1h30m)'.format([self])"#,
        )
        .expr(),
        rule(Claim, "spec.ttl", DURATION_ABOVE_ZERO, DURATION_ZERO).expr(),
        rule(Claim, "spec.ttl", DURATION_AT_MOST_MAX, DURATION_TOO_LARGE).expr(),
        rule(
            Claim,
            "spec",
            "!has(self.files) || self.files.all(k, k != '' && !k.startsWith('/'))",
            r#"'file path "%s" must be relative to the mount path'.format([self.files.filter(k, k == '' || k.startsWith('/'))[0]])"#,
        )
        .expr()
        .field(".files"),
        rule(
            Claim,
            "spec",
            "!has(self.files) || self.files.all(k, k.split('/').all(s, s != '..' && s != ''))",
            r#"'file path "%s" must not contain \'..\' or empty segments'.format([self.files.filter(k, !k.split('/').all(s, s != '..' && s != ''))[0]])"#,
        )
        .expr()
        .field(".files"),
        rule(
            Claim,
            "spec",
            "!has(self.files) || self.files.all(k, size(k) <= 1024 && k.split('/').all(s, size(s) <= 255))",
            r#"'file path "%s" is too long (names of at most 255 bytes, 1024 bytes in all)'.format([self.files.filter(k, size(k) > 1024 || k.split('/').exists(s, size(s) > 255))[0]])"#,
        )
        .expr()
        .field(".files"),
        rule(
            Claim,
            "spec",
            "!has(self.files) || self.files.all(k, !k.matches('[\\x00-\\x1f\\x7f]'))",
            r#"'file path "%s" must not contain control characters'.format([self.files.filter(k, k.matches('[\x00-\x1f\x7f]'))[0]])"#,
        )
        .expr()
        .field(".files"),
        rule(
            Claim,
            "spec",
            "!has(self.files) || self.files.all(k, k.split('/').exists(s, s != '.'))",
            r#"'file path "%s" names no file'.format([self.files.filter(k, k.split('/').all(s, s == '.'))[0]])"#,
        )
        .expr()
        .field(".files"),
        // User
        rule(
            User,
            "spec.sshKeys[]",
            "self.trim().startsWith('ssh-') || self.trim().startsWith('ecdsa-') || self.trim().startsWith('sk-')",
            r#"not an OpenSSH public key (expected e.g. "ssh-ed25519 AAAA... comment")"#,
        ),
        rule(
            User,
            "spec.tokenSha256",
            "self.matches('^[0-9a-fA-F]{64}$')",
            "must be the 64 hex digits of a SHA-256 (`printf %s TOKEN | sha256sum`), not the token",
        ),
        rule(
            User,
            "spec.passwordHash",
            concat!("self.matches('", crate::password_hash_pattern!(), "')"),
            "must be an argon2id hash in the PHC format ($argon2id$v=19$m=...,t=...,p=...$SALT$HASH; `poolkeeper user passwd NAME` makes one), not the password, with m=32..65536 (KiB), t=1..10 and p=1..4",
        ),
        rule(
            User,
            "spec",
            "!has(self.tokenSha256) || !has(self.tokenSecretFile)",
            "give tokenSha256 or tokenSecretFile, not both",
        )
        .field(".tokenSecretFile"),
        rule(
            User,
            "spec",
            "!has(self.tokenSecretRef) || (!has(self.tokenSha256) && !has(self.tokenSecretFile))",
            "give one of tokenSha256, tokenSecretFile and tokenSecretRef",
        )
        .field(".tokenSecretRef"),
        // Deployment
        rule(
            Deployment,
            "spec",
            "has(self.containers) && size(self.containers) > 0",
            "a deployment needs at least one container",
        ),
        rule(
            Deployment,
            "spec.containers[]",
            "!self.name.matches('^[0-9]')",
            r#"'container name "%s" must start with a letter (it names a Kubernetes Service)'.format([self.name])"#,
        )
        .expr()
        .field(".name"),
        rule(
            Deployment,
            "",
            concat!("!has(self.spec.containers) || self.spec.containers.all(c, ", instance_name_fits!(), ")"),
            r#"'an instance name of deployment "%s" is longer than 63 characters (the instances of a container are named DEPLOYMENT-CONTAINER, and -N with replicas)'.format([self.metadata.name])"#,
        )
        .expr()
        .field(".spec.containers"),
        rule(
            Deployment,
            "spec.network",
            "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 63",
            r#"'name "%s" must consist of lowercase letters, digits and \'-\', and start and end with a letter or digit'.format([self])"#,
        )
        .expr(),
        rule(
            Deployment,
            "spec.containers[]",
            "self.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.name) <= 63",
            r#"'name "%s" must consist of lowercase letters, digits and \'-\', and start and end with a letter or digit'.format([self.name])"#,
        )
        .expr()
        .field(".name"),
        rule(
            Deployment,
            "spec.containers[]",
            "self.image.trim() != ''",
            "image must not be empty",
        )
        .field(".image"),
        rule(
            Deployment,
            "spec",
            "!has(self.containers) || self.containers.all(c, self.containers.filter(o, o.name == c.name).size() == 1)",
            r#"'duplicate container name "%s"'.format([self.containers.filter(c, self.containers.filter(o, o.name == c.name).size() > 1)[0].name])"#,
        )
        .expr()
        .field(".containers"),
        rule(
            Deployment,
            "spec",
            "!has(self.containers) || self.containers.all(c, !has(c.dependsOn) || c.dependsOn.all(d, self.containers.exists(o, o.name == d)))",
            "dependsOn names a container that is not in this deployment",
        )
        .field(".containers"),
        rule(
            Deployment,
            "spec.containers[]",
            "!has(self.dependsOn) || !self.dependsOn.exists(d, d == self.name)",
            "a container cannot depend on itself",
        )
        .field(".dependsOn"),
    ]);
    for (kind, at, exec) in [
        (
            Pool,
            "spec.template.readiness",
            "spec.template.readiness.exec",
        ),
        (
            Deployment,
            "spec.containers[].readiness",
            "spec.containers[].readiness.exec",
        ),
        (
            Deployment,
            "spec.containers[].liveness",
            "spec.containers[].liveness.exec",
        ),
    ] {
        rules.push(
            rule(
                kind,
                at,
                "[has(self.httpGet), has(self.tcpSocket), has(self.exec)].filter(x, x).size() == 1",
                "'exactly one of httpGet, tcpSocket, exec must be set (found %d)'.format([[has(self.httpGet), has(self.tcpSocket), has(self.exec)].filter(x, x).size()])",
            )
            .expr(),
        );
        rules.push(
            rule(
                kind,
                exec,
                "size(self.command) > 0",
                "command must not be empty",
            )
            .field(".command"),
        );
    }
    rules
}

/// Bounds on what the rules walk: the API server estimates each rule's cost from them.
fn bounds(kind: Kind) -> &'static [(&'static str, &'static str, u64)] {
    match kind {
        Kind::Pool => &[
            ("spec.template.image", "maxLength", 4096),
            ("spec.template.ports", "maxItems", 64),
            ("spec.template.ports[].name", "maxLength", 63),
            ("spec.template.files.mountPath", "maxLength", 4096),
            ("spec.template.ssh.user", "maxLength", 253),
            ("spec.template.readiness.exec.command", "maxItems", 256),
            ("spec.resetCommand", "maxItems", 256),
            ("spec.claimTTL", "maxLength", 64),
        ],
        Kind::Claim => &[
            ("spec.pool", "maxLength", 253),
            ("spec.user", "maxLength", 253),
            ("spec.ttl", "maxLength", 64),
            ("spec.files", "maxProperties", 256),
        ],
        Kind::User => &[
            ("spec.sshKeys", "maxItems", 256),
            ("spec.sshKeys[]", "maxLength", 16384),
            ("spec.tokenSha256", "maxLength", 128),
            ("spec.passwordHash", "maxLength", 512),
        ],
        Kind::Deployment => &[
            ("spec.network", "maxLength", 253),
            ("spec.containers", "maxItems", 64),
            ("spec.containers[].name", "maxLength", 253),
            ("spec.containers[].image", "maxLength", 4096),
            ("spec.containers[].dependsOn", "maxItems", 16),
            ("spec.containers[].dependsOn[]", "maxLength", 253),
            ("spec.containers[].readiness.exec.command", "maxItems", 256),
            ("spec.containers[].liveness.exec.command", "maxItems", 256),
        ],
    }
}

/// The schema node at a dotted path (`spec.template.ports[].name`), if the schema has it.
fn node<'a>(root: &'a mut Value, at: &str) -> Option<&'a mut Value> {
    let mut n = root;
    if at.is_empty() {
        return Some(n);
    }
    for seg in at.split('.') {
        let (name, items) = match seg.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (seg, false),
        };
        n = n.get_mut("properties")?.get_mut(name)?;
        if items {
            n = n.get_mut("items")?;
        }
    }
    Some(n)
}

/// `format: uintN` (schemars) as the formats Kubernetes knows, with the type's bounds.
fn fix_formats(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let bounds = match m.get("format").and_then(Value::as_str) {
                Some("uint8") => Some(("int32", u64::from(u8::MAX))),
                Some("uint16") => Some(("int32", u64::from(u16::MAX))),
                Some("uint32") => Some(("int64", u64::from(u32::MAX))),
                // No maximum: the API server reads bounds as floats, and `i64::MAX` is not one.
                Some("uint64") => Some(("int64", 0)),
                _ => None,
            };
            if let Some((format, max)) = bounds {
                m.insert("format".into(), json!(format));
                m.insert("minimum".into(), json!(0));
                if max > 0 {
                    m.insert("maximum".into(), json!(max));
                }
            }
            for child in m.values_mut() {
                fix_formats(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(fix_formats),
        _ => {}
    }
}

fn shape(kind: Kind, crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let Ok(mut v) = serde_json::to_value(&crd) else {
        return crd;
    };
    let rules = rules();
    if let Some(versions) = v
        .pointer_mut("/spec/versions")
        .and_then(Value::as_array_mut)
    {
        for version in versions {
            let Some(schema) = version.pointer_mut("/schema/openAPIV3Schema") else {
                continue;
            };
            fix_formats(schema);
            // Conditions merge by type under server-side apply: a condition another controller
            // sets on the object is its own, and the controller's status writes leave it alone.
            if let Some(Value::Object(m)) = node(schema, "status.conditions") {
                m.insert("x-kubernetes-list-type".into(), json!("map"));
                m.insert("x-kubernetes-list-map-keys".into(), json!(["type"]));
            }
            for (at, key, value) in bounds(kind) {
                if let Some(Value::Object(m)) = node(schema, at) {
                    m.insert((*key).to_owned(), json!(value));
                }
            }
            for r in rules.iter().filter(|r| r.kind == kind) {
                let Some(Value::Object(m)) = node(schema, r.at) else {
                    continue;
                };
                let mut entry = Map::new();
                entry.insert("rule".into(), json!(r.rule));
                let key = if r.expr {
                    "messageExpression"
                } else {
                    "message"
                };
                entry.insert(key.into(), json!(r.message));
                if let Some(f) = r.field {
                    entry.insert("fieldPath".into(), json!(f));
                }
                let list = m
                    .entry("x-kubernetes-validations")
                    .or_insert_with(|| json!([]));
                if let Some(a) = list.as_array_mut() {
                    a.push(Value::Object(entry));
                }
            }
        }
    }
    serde_json::from_value(v).unwrap_or(crd)
}

/// All CRDs, shaped (see the module's doc), in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        shape(Kind::Pool, Pool::crd()),
        shape(Kind::Claim, Claim::crd()),
        shape(Kind::User, User::crd()),
        shape(Kind::Deployment, Deployment::crd()),
    ]
}

/// All CRDs as one multi-document YAML stream, in a stable order.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for crd in &crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_integer_format_kubernetes_does_not_know_is_left() {
        let yaml = crds_yaml().expect("yaml");
        assert!(!yaml.contains("format: uint"), "{yaml}");
    }

    #[test]
    fn the_duration_bound_is_validates_own() {
        let bound = format!(" <= {}.0", crate::units::MAX_DURATION_MS);
        assert!(
            DURATION_AT_MOST_MAX.ends_with(&bound),
            "{DURATION_AT_MOST_MAX}"
        );
        assert!(crate::units::parse_duration("36500d").is_ok());
        assert!(crate::units::parse_duration("36499d24h1ms").is_err());
    }

    #[test]
    fn every_kinds_conditions_are_a_list_keyed_by_type() {
        for crd in crds() {
            let v = serde_json::to_value(&crd).expect("json");
            let at =
                "/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/conditions";
            let conditions = v.pointer(at).expect("status.conditions");
            assert_eq!(
                conditions["x-kubernetes-list-type"], "map",
                "{}",
                crd.spec.names.kind
            );
            assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
            let required = conditions["items"]["required"]
                .as_array()
                .expect("required");
            assert!(
                required.contains(&json!("type")),
                "a map key must be required"
            );
        }
    }

    #[test]
    fn every_rule_finds_its_place_in_the_schema() {
        for kind in Kind::ALL {
            let crd = match kind {
                Kind::Pool => Pool::crd(),
                Kind::Claim => Claim::crd(),
                Kind::User => User::crd(),
                Kind::Deployment => Deployment::crd(),
            };
            let mut v = serde_json::to_value(&crd).expect("json");
            let schema = v
                .pointer_mut("/spec/versions/0/schema/openAPIV3Schema")
                .expect("schema");
            for r in rules().iter().filter(|r| r.kind == kind) {
                assert!(node(schema, r.at).is_some(), "{kind}: no {}", r.at);
            }
            for (at, ..) in bounds(kind) {
                assert!(node(schema, at).is_some(), "{kind}: no {at}");
            }
        }
    }
}
