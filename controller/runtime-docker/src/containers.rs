//! Creating, removing and inspecting containers: images, ports, mounts, volumes, files folders.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerSummary, EndpointSettings, ExecConfig, HostConfig, Mount,
    MountType, MountVolumeOptions, MountVolumeOptionsDriverConfig, NetworkingConfig,
    PortBinding as DockerPortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptions, StopContainerOptionsBuilder,
};
use futures::StreamExt;
use tracing::{debug, info, warn};

use poolkeeper_kinds::{PullPolicy, VolumeMode};
use poolkeeper_runtime::{
    ExecOutput, Instance, InstanceSpec, LABEL_CONTAINER, LABEL_CONTROLLER, LABEL_DEPLOYMENT,
    LABEL_FILES_DIR, LABEL_LIVENESS, LABEL_MANAGED, LABEL_POOL, LABEL_PORTS, LABEL_READINESS,
    Result, RuntimeError,
};

use crate::errors::{docker_message, map_err, start_error, status_of};
use crate::labels::{encode_ports, proto, tracked, tracked_from_inspect};
use crate::{DockerRuntime, FILES_SWEEP_AFTER, Tracked};

impl DockerRuntime {
    pub(crate) async fn inspect(&self, i: usize, name: &str) -> Result<Option<Tracked>> {
        let docker = self.docker(i)?;
        match docker.inspect_container(name, None).await {
            Ok(r) => Ok(tracked_from_inspect(i, &r)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(map_err(e, name)),
        }
    }

    pub(crate) async fn list_node(&self, i: usize) -> Result<Vec<(String, ContainerSummary)>> {
        let mut filters = HashMap::new();
        filters.insert("label", self.owner_filter());
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker(i)?
            .list_containers(Some(opts))
            .await
            .map_err(|e| map_err(e, &self.inner.nodes[i].config.name))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c
                    .names
                    .as_ref()?
                    .first()?
                    .trim_start_matches('/')
                    .to_owned();
                Some((name, c))
            })
            .collect())
    }

    async fn ensure_image(&self, docker: &Docker, image: &str, policy: PullPolicy) -> Result<()> {
        let present = match docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if status_of(&e) == Some(404) => false,
            Err(e) => return Err(map_err(e, image)),
        };
        let pull = match policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Never => false,
        };
        if !pull {
            return if present {
                Ok(())
            } else {
                Err(RuntimeError::ImageMissing {
                    image: image.to_owned(),
                    reason: "not present on the node, and pullPolicy is Never".to_owned(),
                })
            };
        }
        info!(image, "pulling image");
        let opts = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut stream = docker.create_image(Some(opts), None, None);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                // A failed pull of an image that is present (pullPolicy Always) keeps the
                // local copy; a missing one is a condition on the pool.
                if present {
                    warn!(image, error = %e, "pull failed; using the local image");
                    return Ok(());
                }
                return Err(RuntimeError::ImageMissing {
                    image: image.to_owned(),
                    reason: format!("not present, and pulling it failed: {}", docker_message(&e)),
                });
            }
        }
        Ok(())
    }

    fn check_binds(&self, spec: &InstanceSpec) -> Result<Vec<String>> {
        let mut binds = Vec::new();
        for (source, mount) in &spec.volumes {
            let mode = match mount.mode {
                VolumeMode::Rw => "rw",
                VolumeMode::Ro => "ro",
            };
            if poolkeeper_core::deployment::is_host_path(source) {
                let Some(root) = &self.inner.config.allowed_bind_root else {
                    return Err(RuntimeError::Failed(format!(
                        "bind mount of host path {source} refused: no allowed bind root is configured"
                    )));
                };
                let path = Path::new(source);
                let resolved = if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    root.join(path)
                };
                if !within(root, &resolved) {
                    return Err(RuntimeError::Failed(format!(
                        "bind mount of host path {source} refused: it is outside the allowed root {}",
                        root.display()
                    )));
                }
                binds.push(format!("{}:{}:{mode}", resolved.display(), mount.bind));
            } else {
                binds.push(format!("{source}:{}:{mode}", mount.bind));
            }
        }
        Ok(binds)
    }

    pub(crate) async fn create_on(&self, i: usize, spec: &InstanceSpec) -> Result<Instance> {
        let began = Instant::now();
        let node = &self.inner.nodes[i];
        let docker = &self.docker(i)?;
        self.ensure_image(docker, &spec.image, spec.pull_policy)
            .await?;
        let binds = self.check_binds(spec)?;
        self.ensure_volumes(docker, spec).await?;
        let files = self.files_folder(i, spec)?;
        let mut labels: HashMap<String, String> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend(self.ownership_labels());
        labels.insert(LABEL_PORTS.to_owned(), encode_ports(&spec.ports));
        if let Some((mount, _)) = &files {
            labels.insert(LABEL_FILES_DIR.to_owned(), mount.clone());
        }
        for (label, probe) in [
            (LABEL_READINESS, &spec.readiness),
            (LABEL_LIVENESS, &spec.liveness),
        ] {
            if let Some(p) = probe {
                labels.insert(
                    label.to_owned(),
                    serde_json::to_string(p).map_err(|e| RuntimeError::Failed(e.to_string()))?,
                );
            }
        }
        // What the runtime tracks is read back from the labels, exactly as for an adopted
        // container after a restart.
        let mut fresh = tracked(i, Some(&labels), None, None);
        fresh.revision = self.next_revision();
        let listen = node
            .config
            .listen_address
            .clone()
            .unwrap_or_else(|| "0.0.0.0".to_owned());
        let mut port_bindings = HashMap::new();
        let mut exposed = Vec::new();
        for p in &spec.ports {
            let key = format!("{}/{}", p.container_port, proto(p.protocol));
            exposed.push(key.clone());
            if p.host_port != 0 {
                port_bindings.insert(
                    key,
                    Some(vec![DockerPortBinding {
                        host_ip: Some(listen.clone()),
                        host_port: Some(p.host_port.to_string()),
                    }]),
                );
            }
        }
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let host_config = HostConfig {
            port_bindings: Some(port_bindings),
            privileged: Some(false),
            init: spec.init.then_some(true),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            cap_drop: spec.capabilities.as_ref().map(|_| vec!["ALL".to_owned()]),
            cap_add: spec.capabilities.clone().filter(|c| !c.is_empty()),
            nano_cpus: spec
                .cpu_millis
                .map(|m| i64::try_from(m.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            memory: spec
                .memory_bytes
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            binds: (!binds.is_empty()).then_some(binds),
            mounts: files
                .as_ref()
                .map(|(mount, dir)| vec![self.files_mount(&spec.name, mount, dir)]),
            network_mode: spec.network.clone(),
            ..Default::default()
        };
        // On a deployment's network, a container answers to its name in the deployment
        // ("db"), as in Compose, besides its container name.
        let networking_config = spec.network.as_ref().and_then(|net| {
            let alias = spec.labels.get(LABEL_CONTAINER)?;
            Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    net.clone(),
                    EndpointSettings {
                        aliases: Some(vec![alias.clone()]),
                        ..Default::default()
                    },
                )])),
            })
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            networking_config,
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: (!env.is_empty()).then_some(env),
            labels: Some(labels),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            host_config: Some(host_config),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        match docker
            .create_container(Some(opts.clone()), body.clone())
            .await
        {
            Ok(_) => {}
            Err(e) if status_of(&e) == Some(409) => {
                // A container of that name exists: a create of ours that timed out earlier, or
                // one left by a crash, is replaced (creates are idempotent); anything else is
                // left alone.
                self.refuse_unless_ours(docker, spec).await?;
                self.remove_on(i, &spec.name).await?;
                // The removal took the files folder with it.
                self.files_folder(i, spec)?;
                docker
                    .create_container(Some(opts), body)
                    .await
                    .map_err(|e| map_err(e, &spec.name))?;
            }
            Err(e) if status_of(&e) == Some(404) && docker_message(&e).contains("network") => {
                return Err(RuntimeError::Failed(format!(
                    "creating {}: {}",
                    spec.name,
                    docker_message(&e)
                )));
            }
            Err(e) if status_of(&e) == Some(404) => {
                return Err(RuntimeError::ImageMissing {
                    image: spec.image.clone(),
                    reason: docker_message(&e),
                });
            }
            Err(e) => return Err(map_err(e, &spec.name)),
        }
        {
            let mut st = self.lock();
            // Not gone any more (a removal of an earlier container of this name marked it).
            st.gone.remove(&spec.name);
            st.instances.insert(spec.name.clone(), fresh);
        }
        if let Err(e) = docker.start_container(&spec.name, None).await {
            let err = start_error(e, &spec.name);
            // Leave nothing half-made behind.
            let _ = self.remove_on(i, &spec.name).await;
            return Err(err);
        }
        let probed = spec.readiness.is_some() || spec.liveness.is_some();
        let ip = self.ip_if(probed, i, &spec.name).await;
        self.mark_started(&spec.name, ip);
        debug!(instance = %spec.name, ms = began.elapsed().as_millis(), "container created and started");
        let st = self.lock();
        st.instances
            .get(&spec.name)
            .map(|t| self.instance_of(&spec.name, t))
            .ok_or_else(|| RuntimeError::NotFound(spec.name.clone()))
    }

    /// Ok when the container named as `spec` is gone or is this controller's, made for the same
    /// pool or deployment; a Conflict when it is anyone else's (another controller's on the same
    /// daemon, or one made by hand), which is never removed.
    async fn refuse_unless_ours(&self, docker: &Docker, spec: &InstanceSpec) -> Result<()> {
        let name = &spec.name;
        let found = match docker.inspect_container(name, None).await {
            Ok(r) => r,
            Err(e) if status_of(&e) == Some(404) => return Ok(()),
            Err(e) => return Err(map_err(e, name)),
        };
        let labels = found.config.and_then(|c| c.labels).unwrap_or_default();
        let same = |key: &str, want: Option<&String>| labels.get(key) == want;
        let ours = self.made_here(&labels)
            && same(LABEL_POOL, spec.labels.get(LABEL_POOL))
            && same(LABEL_DEPLOYMENT, spec.labels.get(LABEL_DEPLOYMENT));
        if ours {
            return Ok(());
        }
        let whose = match labels.get(LABEL_CONTROLLER) {
            Some(c) if labels.get(LABEL_MANAGED).is_some_and(|m| m == "true") => {
                format!("poolkeeper controller {c}'s")
            }
            _ => "not made by poolkeeper".to_owned(),
        };
        Err(RuntimeError::Conflict {
            instance: name.clone(),
            reason: format!(
                "a container named {name} exists on the daemon ({whose}, or another pool's or \
                 deployment's); it is left alone"
            ),
            holder: None,
        })
    }

    pub(crate) async fn remove_on(&self, i: usize, name: &str) -> Result<()> {
        let began = Instant::now();
        let graceful = self
            .lock()
            .instances
            .get(name)
            .is_some_and(|t| t.labels.contains_key(LABEL_DEPLOYMENT));
        if graceful {
            let opts = StopContainerOptionsBuilder::default()
                .t(self.inner.config.stop_grace_secs)
                .build();
            match self.docker(i)?.stop_container(name, Some(opts)).await {
                // 304: already stopped.
                Ok(()) => {}
                Err(e) if matches!(status_of(&e), Some(304 | 404)) => {}
                Err(e) => debug!(instance = %name, error = %e, "graceful stop failed; removing"),
            }
        }
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let r = self.docker(i)?.remove_container(name, Some(opts)).await;
        match r {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            // Already being removed by an earlier call.
            Err(e) if status_of(&e) == Some(409) && docker_message(&e).contains("in progress") => {}
            Err(e) => return Err(map_err(e, name)),
        }
        debug!(instance = %name, ms = began.elapsed().as_millis(), "container removed");
        {
            let mut guard = self.lock();
            self.container_gone(&mut guard, i, name);
        }
        self.drop_files_folder(&[i], name).await;
        Ok(())
    }

    /// Creates the named volumes `spec` mounts that do not exist yet, labelled as this
    /// controller's and its deployment's, so that deleting the deployment finds them.
    async fn ensure_volumes(&self, docker: &Docker, spec: &InstanceSpec) -> Result<()> {
        for source in spec.volumes.keys() {
            if poolkeeper_core::deployment::is_host_path(source) {
                continue;
            }
            match docker.inspect_volume(source).await {
                Ok(_) => continue,
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(map_err(e, source)),
            }
            let mut labels = self.ownership_labels();
            if let Some(d) = spec.labels.get(LABEL_DEPLOYMENT) {
                labels.insert(LABEL_DEPLOYMENT.to_owned(), d.clone());
            }
            let req = VolumeCreateRequest {
                name: Some(source.clone()),
                labels: Some(labels),
                ..Default::default()
            };
            docker
                .create_volume(req)
                .await
                .map_err(|e| map_err(e, source))?;
        }
        Ok(())
    }

    /// The labels that mark what this controller makes (containers, volumes, networks) as its
    /// own.
    pub(crate) fn ownership_labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (
                LABEL_CONTROLLER.to_owned(),
                self.inner.config.controller_id.clone(),
            ),
        ])
    }

    /// Whether `labels` (a container's, a network's) carry [`Self::ownership_labels`]: made by
    /// this controller.
    pub(crate) fn made_here(&self, labels: &HashMap<String, String>) -> bool {
        labels.get(LABEL_MANAGED).is_some_and(|m| m == "true")
            && labels
                .get(LABEL_CONTROLLER)
                .is_some_and(|c| *c == self.inner.config.controller_id)
    }

    /// The host-backed files folder for `spec`'s instance on node `i`, freshly emptied:
    /// `(mount path, folder)`, or `None` when its files go through the API.
    fn files_folder(&self, i: usize, spec: &InstanceSpec) -> Result<Option<(String, PathBuf)>> {
        let (Some(mount), Some(hf)) = (&spec.files_dir, &self.inner.host_files) else {
            return Ok(None);
        };
        if !self.inner.nodes[i].config.shares_files() {
            return Ok(None);
        }
        let dir = hf.prepare(&spec.name).map_err(|e| {
            RuntimeError::Failed(format!(
                "preparing the files folder {}: {e}",
                hf.dir_of(&spec.name).display()
            ))
        })?;
        Ok(Some((mount.clone(), dir)))
    }

    /// A `local` volume bound to `dir`, mounted at `mount`: Docker fills it from the image's
    /// content at `mount` when the container is created, as any empty named volume.
    fn files_mount(&self, name: &str, mount: &str, dir: &Path) -> Mount {
        Mount {
            target: Some(mount.to_owned()),
            source: Some(files_volume(name)),
            typ: Some(MountType::VOLUME),
            volume_options: Some(MountVolumeOptions {
                no_copy: Some(false),
                labels: Some(self.ownership_labels()),
                driver_config: Some(MountVolumeOptionsDriverConfig {
                    name: Some("local".to_owned()),
                    options: Some(HashMap::from([
                        ("type".to_owned(), "none".to_owned()),
                        ("o".to_owned(), "bind".to_owned()),
                        ("device".to_owned(), dir.display().to_string()),
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Removes `name`'s files volume (from `nodes`) and folder, if it has them.
    pub(crate) async fn drop_files_folder(&self, nodes: &[usize], name: &str) {
        let Some(hf) = &self.inner.host_files else {
            return;
        };
        if !hf.dir_of(name).exists() {
            return;
        }
        for &i in nodes {
            if !self.inner.nodes[i].config.shares_files() {
                continue;
            }
            let Ok(docker) = self.docker(i) else {
                return;
            };
            match docker
                .remove_volume(&files_volume(name), None::<RemoveVolumeOptions>)
                .await
            {
                Ok(()) => {}
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => {
                    // Still in use (a container of that name exists again) or unreachable: the
                    // folder stays; a later list sweeps it.
                    debug!(instance = %name, error = %e, "files volume not removed");
                    return;
                }
            }
        }
        if let Err(e) = hf.remove(name) {
            warn!(instance = %name, folder = %hf.dir_of(name).display(), error = %e,
                "removing the files folder failed");
        }
    }

    /// Files folders of containers that no longer exist (removed by hand, or left by a crash):
    /// removed once they are older than [`FILES_SWEEP_AFTER`], so that a creation in flight
    /// (folder made, container not yet listed) keeps its own.
    pub(crate) async fn sweep_files_folders(&self, listed: &HashSet<String>) {
        let Some(hf) = &self.inner.host_files else {
            return;
        };
        let stale: Vec<String> = {
            let st = self.lock();
            hf.instances()
                .into_iter()
                .filter(|n| !listed.contains(n) && !st.instances.contains_key(n))
                .filter(|n| {
                    std::fs::metadata(hf.dir_of(n))
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > FILES_SWEEP_AFTER)
                })
                .collect()
        };
        let all: Vec<usize> = (0..self.inner.nodes.len()).collect();
        for name in stale {
            debug!(instance = %name, "sweeping a files folder whose container is gone");
            self.drop_files_folder(&all, &name).await;
        }
    }
}

/// Runs `command` in `container` and collects its exit code and combined output (the
/// runtime's probes and resets, and the CLI's `exec --steps`).
pub async fn exec_output(
    docker: &Docker,
    container: &str,
    command: &[String],
) -> std::result::Result<ExecOutput, DockerError> {
    let exec = docker
        .create_exec(
            container,
            ExecConfig {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(command.to_vec()),
                ..Default::default()
            },
        )
        .await?;
    let mut output = String::new();
    if let StartExecResults::Attached {
        output: mut out, ..
    } = docker
        .start_exec(&exec.id, None::<StartExecOptions>)
        .await?
    {
        while let Some(chunk) = out.next().await {
            output.push_str(&String::from_utf8_lossy(&chunk?.into_bytes()));
        }
    }
    let info = docker.inspect_exec(&exec.id).await?;
    Ok(ExecOutput {
        exit_code: info.exit_code.unwrap_or(-1),
        output,
    })
}

/// The volume that mounts `name`'s host-backed files folder.
pub(crate) fn files_volume(name: &str) -> String {
    format!("{name}-files")
}

pub(crate) fn within(root: &Path, path: &Path) -> bool {
    let mut normal = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !normal.pop() {
                    return false;
                }
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal.starts_with(root)
}

pub(crate) use poolkeeper_runtime::tar_of;
