//! Serves the fake API server until Ctrl-C, and writes a kubeconfig that names it, so that a
//! command that reads `KUBECONFIG` (e.g. `poolkeeper bench --source kube`) can run against an
//! API server that costs next to nothing: what such a run measures is the client's side.
//!
//! ```sh
//! cargo run --release -p poolkeeper-kube-fake --example serve -- /tmp/fake.kubeconfig
//! KUBECONFIG=/tmp/fake.kubeconfig target/release/poolkeeper bench --source kube ...
//! ```

use poolkeeper_kube_fake::FakeApi;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(path) = std::env::args().nth(1) else {
        return Err("usage: serve KUBECONFIG_TO_WRITE".into());
    };
    let api = FakeApi::start().await;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\n\
         users: [{{name: fake, user: {{}}}}]\n\
         contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: default}}}}]\n\
         current-context: fake\n",
        url = api.url
    );
    std::fs::write(&path, kubeconfig).map_err(|e| format!("writing {path}: {e}"))?;
    println!("serving {} (kubeconfig {path}); Ctrl-C stops", api.url);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
