//! The CustomResourceDefinitions, generated from the Rust types.

use kube::CustomResourceExt;

use crate::{Claim, Deployment, Pool, User};

/// All CRDs as one multi-document YAML stream, in a stable order.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let crds = [Pool::crd(), Claim::crd(), User::crd(), Deployment::crd()];
    let mut out = String::new();
    for crd in &crds {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(crd)?);
    }
    Ok(out)
}
