//! The fake API server's semantics that the controller's writes rely on, through kube's own
//! client: JSON patches that test what they change, finalizers that hold a deleted object, and
//! cluster-scoped namespaces.

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use poolkeeper_kube_fake::FakeApi;
use serde_json::json;

fn claims(api: &FakeApi) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("poolkeeper.dev", "v1alpha1", "Claim");
    Api::namespaced_with(api.client(), "ns", &ApiResource::from_gvk(&gvk))
}

fn claim(name: &str, finalizers: &[&str]) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "Claim",
        "metadata": {"name": name, "finalizers": finalizers},
        "spec": {"pool": "web"},
    }))
    .expect("a claim")
}

fn json_patch(ops: serde_json::Value) -> Patch<()> {
    Patch::Json(serde_json::from_value(ops).expect("a JSON patch"))
}

#[tokio::test]
async fn a_json_patch_applies_and_one_whose_test_fails_is_refused_with_422() {
    let api = FakeApi::start().await;
    let claims = claims(&api);
    claims
        .create(&PostParams::default(), &claim("a", &[]))
        .await
        .expect("created");

    let add = json_patch(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": []},
        {"op": "add", "path": "/metadata/finalizers/-", "value": "poolkeeper.dev/cleanup"},
    ]));
    let patched = claims
        .patch("a", &PatchParams::default(), &add)
        .await
        .expect("patched");
    assert_eq!(
        patched.metadata.finalizers,
        Some(vec!["poolkeeper.dev/cleanup".to_owned()])
    );

    // The same patch again: its test sees a list that is no longer empty.
    let err = claims
        .patch("a", &PatchParams::default(), &add)
        .await
        .expect_err("a stale test is refused");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err}"
    );
    let now = api
        .get("poolkeeper.dev/claims", "ns", "a")
        .expect("still there");
    assert_eq!(
        now["metadata"]["finalizers"],
        json!(["poolkeeper.dev/cleanup"])
    );
}

#[tokio::test]
async fn a_missing_member_tests_equal_to_null_as_on_the_api_server() {
    let api = FakeApi::start().await;
    let claims = claims(&api);
    let bare: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "poolkeeper.dev/v1alpha1", "kind": "Claim",
        "metadata": {"name": "bare"}, "spec": {"pool": "web"},
    }))
    .expect("a claim");
    claims
        .create(&PostParams::default(), &bare)
        .await
        .expect("created");
    let add = json_patch(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["poolkeeper.dev/cleanup"]},
    ]));
    claims
        .patch("bare", &PatchParams::default(), &add)
        .await
        .expect("a missing list tests equal to null");
    let err = claims
        .patch("bare", &PatchParams::default(), &add)
        .await
        .expect_err("a list that is there does not");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err}"
    );
}

#[tokio::test]
async fn a_deleted_object_is_held_by_its_finalizers_until_the_last_goes() {
    let api = FakeApi::start().await;
    let claims = claims(&api);
    claims
        .create(&PostParams::default(), &claim("held", &["x/one", "x/two"]))
        .await
        .expect("created");
    claims
        .create(&PostParams::default(), &claim("free", &[]))
        .await
        .expect("created");

    claims
        .delete("free", &DeleteParams::default())
        .await
        .expect("deleted");
    assert!(api.get("poolkeeper.dev/claims", "ns", "free").is_none());

    claims
        .delete("held", &DeleteParams::default())
        .await
        .expect("deleted");
    let held = api
        .get("poolkeeper.dev/claims", "ns", "held")
        .expect("held");
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");

    let remove_first = json_patch(json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "x/one"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]));
    claims
        .patch("held", &PatchParams::default(), &remove_first)
        .await
        .expect("patched");
    assert!(
        api.get("poolkeeper.dev/claims", "ns", "held").is_some(),
        "x/two still holds it"
    );

    let remove_last = json_patch(json!([{"op": "remove", "path": "/metadata/finalizers/0"}]));
    claims
        .patch("held", &PatchParams::default(), &remove_last)
        .await
        .expect("patched");
    assert!(
        api.get("poolkeeper.dev/claims", "ns", "held").is_none(),
        "gone with its last finalizer"
    );
}

#[tokio::test]
async fn namespaces_are_cluster_scoped_objects() {
    let api = FakeApi::start().await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(api.client());
    let ns = serde_json::from_value(json!({"metadata": {"name": "team-a"}})).expect("a namespace");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("created");
    let got = namespaces.get("team-a").await.expect("read back");
    assert_eq!(got.metadata.name.as_deref(), Some("team-a"));
    namespaces
        .delete("team-a", &DeleteParams::default())
        .await
        .expect("deleted");
    assert!(namespaces.get_opt("team-a").await.expect("asked").is_none());
}
