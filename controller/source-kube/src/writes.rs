//! Every write the controller makes to custom resources: finalizers added and removed with a JSON
//! patch that tests what it changes (a stale view is refused, never overwritten), and status by
//! server-side apply on the `/status` subresource under one field manager. Each is counted, so
//! that a benchmark can tell how many writes a claim costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use poolkeeper_kinds::Kind;

use crate::objects::{FINALIZER, Seen, api_resource};

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "poolkeeper";

/// Writes made, by what they were.
#[derive(Debug, Default)]
pub struct Counters {
    pub status: AtomicU64,
    pub finalizers: AtomicU64,
    pub events: AtomicU64,
    pub objects: AtomicU64,
}

impl Counters {
    /// Every write so far.
    pub fn total(&self) -> u64 {
        [&self.status, &self.finalizers, &self.events, &self.objects]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Makes the controller's writes.
#[derive(Clone)]
pub struct Writer {
    client: Client,
    recorder: Recorder,
    pub counters: Arc<Counters>,
}

impl Writer {
    pub fn new(client: Client, instance: Option<String>) -> Writer {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance,
        };
        Writer {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            counters: Arc::default(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn api(&self, kind: Kind, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &api_resource(kind))
    }

    /// Adds [`FINALIZER`] to what `seen` shows the object holds. The patch tests the list it
    /// extends, so that a finalizer list changed meanwhile is refused (422), not overwritten.
    pub async fn add_finalizer(&self, seen: &Seen) -> Result<(), kube::Error> {
        let patch = if seen.finalizers.is_empty() {
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        } else {
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": seen.finalizers},
                {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
            ])
        };
        self.json_patch(seen, patch).await
    }

    /// Removes [`FINALIZER`], testing that it is where `seen` shows it.
    pub async fn remove_finalizer(&self, seen: &Seen) -> Result<(), kube::Error> {
        let Some(i) = seen.finalizers.iter().position(|f| f == FINALIZER) else {
            return Ok(());
        };
        let at = format!("/metadata/finalizers/{i}");
        self.json_patch(
            seen,
            json!([
                {"op": "test", "path": at, "value": FINALIZER},
                {"op": "remove", "path": at},
            ]),
        )
        .await
    }

    async fn json_patch(&self, seen: &Seen, patch: Value) -> Result<(), kube::Error> {
        let patch: json_patch::Patch =
            serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
        self.counters.finalizers.fetch_add(1, Ordering::Relaxed);
        self.api(seen.kind, &seen.namespace)
            .patch(
                &seen.name,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await
            .map(|_| ())
    }

    /// Applies `status` on the object's `/status` (server-side apply, field manager
    /// [`FIELD_MANAGER`], forced: the controller owns status).
    pub async fn apply_status(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        status: &Value,
    ) -> Result<(), kube::Error> {
        let ar = api_resource(kind);
        let body = json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "status": status,
        });
        self.counters.status.fetch_add(1, Ordering::Relaxed);
        self.api(kind, namespace)
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map(|_| ())
    }

    /// Records an Event on the object (events.k8s.io; repeats within minutes become a series).
    pub async fn event(
        &self,
        seen: &Seen,
        warning: bool,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        self.recorder.publish(&ev, &seen.reference()).await
    }

    /// Creates a custom resource (a Claim made through the HTTP API).
    pub async fn create(
        &self,
        kind: Kind,
        namespace: &str,
        obj: &DynamicObject,
    ) -> Result<DynamicObject, kube::Error> {
        self.counters.objects.fetch_add(1, Ordering::Relaxed);
        self.api(kind, namespace)
            .create(&Default::default(), obj)
            .await
    }

    /// Reads a custom resource: None when it is not there.
    pub async fn get(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Option<DynamicObject>, kube::Error> {
        self.api(kind, namespace).get_opt(name).await
    }

    /// Deletes a custom resource: Ok(false) when it was not there.
    pub async fn delete(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<bool, kube::Error> {
        self.counters.objects.fetch_add(1, Ordering::Relaxed);
        match self
            .api(kind, namespace)
            .delete(name, &Default::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets fields of a custom resource's spec (a JSON merge patch: `scale` sets `warm`).
    pub async fn merge_spec(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        spec: Value,
    ) -> Result<DynamicObject, kube::Error> {
        self.counters.objects.fetch_add(1, Ordering::Relaxed);
        self.api(kind, namespace)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
    }
}

/// The object's name, for messages.
pub fn name_of(obj: &DynamicObject) -> String {
    obj.name_any()
}

/// Whether an API error is `code`.
pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}
