//! Pure translations between the runtime's instances and Kubernetes objects: the Pod and the
//! Service made for an [`InstanceSpec`], and the [`Instance`] a Pod reports. No I/O, so that
//! every field the cluster sees is unit-tested.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort as KContainerPort, EnvVar, ExecAction, HTTPGetAction,
    LocalObjectReference, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe as KProbe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Toleration as KToleration, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use poolkeeper_kinds::{ContainerPort, Exposure, PortRef, Probe, PullPolicy, VolumeMode};
use poolkeeper_runtime::{
    Instance, InstanceSpec, InstanceState, LABEL_CLAIM, LABEL_CONTAINER, LABEL_CONTROLLER,
    LABEL_DEPLOYMENT, LABEL_MANAGED, PortBinding, RuntimeError, decode_ports, encode_ports,
};

/// The instance's ports (`name:containerPort:hostPort/protocol`, as the Docker runtime's label),
/// so that the endpoint of an adopted pod is known without its Pool.
pub const ANNOTATION_PORTS: &str = "poolkeeper.dev/ports";
/// How the instance is exposed (`ClusterIP`, `NodePort`, `HostPort`, `LoadBalancer`).
pub const ANNOTATION_EXPOSURE: &str = "poolkeeper.dev/exposure";

/// The capabilities a pod keeps when its template names none: the baseline Pod Security
/// Standard's list (Docker's default set without `NET_RAW`), so that images written for Docker
/// (nginx as root, sshd) start unchanged.
pub const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// A host path (`/srv`, `./data`) rather than a named volume, as the engine tells them apart.
fn is_host_path(source: &str) -> bool {
    source.starts_with('/') || source.starts_with('.')
}

/// The exposure an instance gets: the declared one, or a ClusterIP Service.
pub fn exposure_of(spec: &InstanceSpec) -> Exposure {
    spec.exposure.unwrap_or_default()
}

/// The pool an instance belongs to, for its ownerReference.
#[derive(Clone, Debug)]
pub struct Owner {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// The pod for `spec` in `namespace`, labelled for `controller`.
pub fn pod_for(
    spec: &InstanceSpec,
    namespace: &str,
    controller: &str,
    owner: Option<&Owner>,
) -> Result<Pod, RuntimeError> {
    let exposure = exposure_of(spec);
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (i, (source, mount)) in spec.volumes.iter().enumerate() {
        if is_host_path(source) {
            return Err(RuntimeError::Failed(format!(
                "volume {source:?} (mounted at {}): host paths are refused by the Kubernetes \
                 runtime; use a named volume (a PersistentVolumeClaim)",
                mount.bind
            )));
        }
        let name = format!("v{i}");
        volumes.push(Volume {
            name: name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc_name(source),
                read_only: None,
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: mount.bind.clone(),
            read_only: (mount.mode == VolumeMode::Ro).then_some(true),
            ..VolumeMount::default()
        });
    }
    let mut labels: BTreeMap<String, String> = (*spec.labels).clone();
    labels.insert(LABEL_CONTROLLER.to_owned(), controller.to_owned());
    labels.insert(POD_NAME_LABEL.to_owned(), spec.name.clone());
    if let Some(net) = &spec.network {
        labels.insert(NETWORK_LABEL.to_owned(), net.clone());
    }
    let annotations = BTreeMap::from([
        (ANNOTATION_PORTS.to_owned(), encode_ports(&ports_of(spec))),
        (ANNOTATION_EXPOSURE.to_owned(), exposure.as_str().to_owned()),
    ]);
    let ports = spec
        .container_ports
        .iter()
        .map(|p| KContainerPort {
            container_port: i32::from(p.container_port),
            host_port: (exposure == Exposure::HostPort || is_deployment(spec))
                .then(|| host_port_of(spec, p))
                .flatten()
                .map(i32::from),
            protocol: Some(p.protocol.as_str().to_owned()),
            ..KContainerPort::default()
        })
        .collect::<Vec<_>>();
    let quantities = quantities(spec.cpu_millis, spec.memory_bytes);
    let resources = (!quantities.is_empty()).then(|| ResourceRequirements {
        limits: Some(quantities.clone()),
        requests: Some(quantities),
        ..ResourceRequirements::default()
    });
    let keep: Vec<String> = match &spec.capabilities {
        Some(c) => c.clone(),
        None => BASELINE_CAPABILITIES
            .iter()
            .map(|c| (*c).to_owned())
            .collect(),
    };
    let container = Container {
        name: "instance".to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(
            match spec.pull_policy {
                PullPolicy::IfNotPresent => "IfNotPresent",
                PullPolicy::Never => "Never",
                PullPolicy::Always => "Always",
            }
            .to_owned(),
        ),
        // The template's command replaces the image's CMD, as on Docker.
        args: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: (!spec.env.is_empty()).then(|| {
            spec.env
                .iter()
                .map(|(k, v)| EnvVar {
                    name: k.clone(),
                    value: Some(v.clone()),
                    ..EnvVar::default()
                })
                .collect()
        }),
        ports: (!ports.is_empty()).then_some(ports),
        readiness_probe: spec
            .readiness
            .as_ref()
            .map(|p| probe_of(p, &spec.container_ports))
            .transpose()?,
        liveness_probe: spec
            .liveness
            .as_ref()
            .map(|p| probe_of(p, &spec.container_ports))
            .transpose()?,
        resources,
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: (!keep.is_empty()).then_some(keep),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let overrides = spec.pod_overrides.clone().unwrap_or_default();
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(spec.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: owner.map(|o| {
                vec![OwnerReference {
                    api_version: o.api_version.clone(),
                    kind: o.kind.clone(),
                    name: o.name.clone(),
                    uid: o.uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: (!volumes.is_empty()).then_some(volumes),
            // An exit is reported and the pool replaces the instance, as on Docker.
            restart_policy: Some("Never".to_owned()),
            automount_service_account_token: Some(false),
            // A namespace with many Services would otherwise fill every instance's environment.
            enable_service_links: Some(false),
            // Docker's `--init`: the pod's pause container becomes PID 1 and reaps zombies;
            // the instance's process gets signals with their default actions, as under tini.
            share_process_namespace: spec.init.then_some(true),
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            node_selector: (!overrides.node_selector.is_empty()).then_some(overrides.node_selector),
            tolerations: (!overrides.tolerations.is_empty()).then(|| {
                overrides
                    .tolerations
                    .into_iter()
                    .map(|t| KToleration {
                        key: t.key,
                        operator: t.operator,
                        value: t.value,
                        effect: t.effect,
                        toleration_seconds: t.toleration_seconds,
                    })
                    .collect()
            }),
            service_account_name: overrides.service_account_name,
            image_pull_secrets: (!overrides.image_pull_secrets.is_empty()).then(|| {
                overrides
                    .image_pull_secrets
                    .into_iter()
                    .map(|name| LocalObjectReference { name })
                    .collect()
            }),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// The Service that exposes the instance, owned by its pod; `None` for `HostPort` exposure
/// or an instance without ports.
pub fn service_for(spec: &InstanceSpec, namespace: &str, pod: &Pod) -> Option<Service> {
    let exposure = exposure_of(spec);
    if exposure == Exposure::HostPort || spec.container_ports.is_empty() || is_deployment(spec) {
        return None;
    }
    let ports = spec
        .container_ports
        .iter()
        .map(|p| ServicePort {
            name: Some(service_port_name(&p.name)),
            port: i32::from(p.container_port),
            target_port: Some(IntOrString::Int(i32::from(p.container_port))),
            protocol: Some(p.protocol.as_str().to_owned()),
            node_port: (exposure == Exposure::NodePort)
                .then(|| host_port_of(spec, p))
                .flatten()
                .map(i32::from),
            ..ServicePort::default()
        })
        .collect();
    let owner = pod.metadata.uid.as_ref().map(|uid| OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: spec.name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    });
    let mut labels: BTreeMap<String, String> = (*spec.labels).clone();
    if let Some(c) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CONTROLLER))
    {
        labels.insert(LABEL_CONTROLLER.to_owned(), c.clone());
    }
    Some(Service {
        metadata: ObjectMeta {
            name: Some(spec.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(exposure.as_str().to_owned()),
            // Only this instance's pod: the pod's name is unique, the label selector is not.
            selector: Some(BTreeMap::from([(
                POD_NAME_LABEL.to_owned(),
                spec.name.clone(),
            )])),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// The uid of the pod that owns an instance's Service.
pub fn owner_pod_uid(svc: &Service) -> Option<&str> {
    svc.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "Pod" && o.api_version == "v1")
        .map(|o| o.uid.as_str())
}

/// An instance's Service made again for its pod made again under the same name (a `Restart`
/// reset): the same ports and selector, owned by the new pod (the garbage collector takes a
/// Service whose owner is gone), with the addresses the cluster assigns left to it.
pub fn service_again(old: &Service, pod: &Pod) -> Service {
    let mut spec = old.spec.clone().unwrap_or_default();
    spec.cluster_ip = None;
    spec.cluster_ips = None;
    let owner = pod.metadata.uid.as_ref().map(|uid| OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    });
    Service {
        metadata: ObjectMeta {
            name: old.metadata.name.clone(),
            namespace: old.metadata.namespace.clone(),
            labels: old.metadata.labels.clone(),
            annotations: old.metadata.annotations.clone(),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The label that names an instance's pod, for its Service's selector.
pub const POD_NAME_LABEL: &str = "poolkeeper.dev/instance";
/// The deployment network a pod is on (its NetworkPolicy selects it by this label).
pub const NETWORK_LABEL: &str = "poolkeeper.dev/network";

/// Whether the instance is a deployment's container (not a pool's instance).
pub fn is_deployment(spec: &InstanceSpec) -> bool {
    spec.labels.contains_key(LABEL_DEPLOYMENT)
}

/// The PersistentVolumeClaim of a deployment's named volume (`DEP_VOLUME`, as Docker names it;
/// `_` is not allowed in Kubernetes names).
pub fn pvc_name(volume: &str) -> String {
    volume.replace('_', "-").to_ascii_lowercase()
}

/// What a named volume asks of the cluster's default StorageClass.
pub const DEFAULT_VOLUME_SIZE: &str = "1Gi";

/// The claim for a deployment's named volume, labelled with its deployment.
pub fn pvc_for(
    volume: &str,
    namespace: &str,
    deployment: &str,
    controller: &str,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(pvc_name(volume)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_DEPLOYMENT.to_owned(), deployment.to_owned()),
                (LABEL_CONTROLLER.to_owned(), controller.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(DEFAULT_VOLUME_SIZE.to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// The headless Service that makes a deployment's container reachable by its name (every
/// replica's address, every port, as on a Docker network).
pub fn container_service(spec: &InstanceSpec, namespace: &str) -> Option<Service> {
    let dep = spec.labels.get(LABEL_DEPLOYMENT)?;
    let container = spec.labels.get(LABEL_CONTAINER)?;
    let selector = BTreeMap::from([
        (LABEL_DEPLOYMENT.to_owned(), dep.clone()),
        (LABEL_CONTAINER.to_owned(), container.clone()),
    ]);
    let mut labels = selector.clone();
    labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
    Some(Service {
        metadata: ObjectMeta {
            name: Some(container.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// Network names may hold `_` (Compose's `NAME_default`); policy names may not.
pub fn network_policy_name(network: &str) -> String {
    format!("network-{}", network.replace('_', "-").to_ascii_lowercase())
}

fn managed_meta(name: String, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([(
            LABEL_MANAGED.to_owned(),
            "true".to_owned(),
        )])),
        ..ObjectMeta::default()
    }
}

fn selecting(key: &str, value: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
        ..LabelSelector::default()
    }
}

/// A deployment network's policy: its pods admit traffic only from pods on the same network.
pub fn network_policy(network: &str, namespace: &str) -> NetworkPolicy {
    let on_network = selecting(NETWORK_LABEL, network);
    NetworkPolicy {
        metadata: managed_meta(network_policy_name(network), namespace),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(on_network.clone()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(on_network),
                    ..NetworkPolicyPeer::default()
                }]),
                ..NetworkPolicyIngressRule::default()
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// The name of the policy that admits a networked pod's published ports.
pub fn published_policy_name(instance: &str) -> String {
    format!("{instance}-published")
}

/// The policy that admits a networked pod's published ports from anywhere (policies add up).
pub fn published_policy(spec: &InstanceSpec, namespace: &str) -> Option<NetworkPolicy> {
    spec.network.as_ref()?;
    if spec.ports.is_empty() {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .map(|p| NetworkPolicyPort {
            port: Some(IntOrString::Int(i32::from(p.container_port))),
            protocol: Some(p.protocol.as_str().to_owned()),
            ..NetworkPolicyPort::default()
        })
        .collect();
    Some(NetworkPolicy {
        metadata: managed_meta(published_policy_name(&spec.name), namespace),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selecting(POD_NAME_LABEL, &spec.name)),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                ports: Some(ports),
                ..NetworkPolicyIngressRule::default()
            }]),
            ..NetworkPolicySpec::default()
        }),
    })
}

/// Service port names must be DNS labels: the declared name, lower-cased.
fn service_port_name(name: &str) -> String {
    name.to_ascii_lowercase()
}

fn host_port_of(spec: &InstanceSpec, p: &ContainerPort) -> Option<u16> {
    spec.ports
        .iter()
        .find(|b| b.name == p.name)
        .map(|b| b.host_port)
}

/// Whether a pod's ports are taken on its node (`Instance::host_ports`): node ports and
/// `hostPort`s, and a deployment's container, which keeps its declared `hostPort`s whatever its
/// Services. Otherwise a Service gives the pod an address of its own.
fn takes_node_ports(exposure: &str, deployment: bool) -> bool {
    deployment || exposure == Exposure::NodePort.as_str() || exposure == Exposure::HostPort.as_str()
}

/// The ports a client uses: the Service's (= container) ports for ClusterIP and LoadBalancer,
/// the allocated host ports for NodePort and HostPort (and a deployment's container).
pub fn ports_of(spec: &InstanceSpec) -> Vec<PortBinding> {
    let on_node = takes_node_ports(exposure_of(spec).as_str(), is_deployment(spec));
    spec.container_ports
        .iter()
        .map(|p| PortBinding {
            name: p.name.clone(),
            container_port: p.container_port,
            host_port: if on_node {
                host_port_of(spec, p).unwrap_or(p.container_port)
            } else {
                p.container_port
            },
            protocol: p.protocol,
        })
        .collect()
}

fn port_of(port: &PortRef, ports: &[ContainerPort]) -> Result<IntOrString, RuntimeError> {
    match port {
        PortRef::Number(n) => Ok(IntOrString::Int(i32::from(*n))),
        PortRef::Name(name) => ports
            .iter()
            .find(|p| &p.name == name)
            .map(|p| IntOrString::Int(i32::from(p.container_port)))
            .ok_or_else(|| RuntimeError::Failed(format!("probe port {name:?} is not declared"))),
    }
}

/// A probe as the kubelet runs it (ports by number: pod port names are stricter than ours).
pub fn probe_of(p: &Probe, ports: &[ContainerPort]) -> Result<KProbe, RuntimeError> {
    let secs = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
    Ok(KProbe {
        http_get: p
            .http_get
            .as_ref()
            .map(|h| {
                Ok::<_, RuntimeError>(HTTPGetAction {
                    path: Some(h.path.clone()),
                    port: port_of(&h.port, ports)?,
                    ..HTTPGetAction::default()
                })
            })
            .transpose()?,
        tcp_socket: p
            .tcp_socket
            .as_ref()
            .map(|t| {
                Ok::<_, RuntimeError>(TCPSocketAction {
                    port: port_of(&t.port, ports)?,
                    ..TCPSocketAction::default()
                })
            })
            .transpose()?,
        exec: p.exec.as_ref().map(|e| ExecAction {
            command: Some(e.command.clone()),
        }),
        initial_delay_seconds: secs(p.initial_delay_seconds),
        period_seconds: secs(p.period_seconds),
        timeout_seconds: secs(p.timeout_seconds),
        failure_threshold: secs(p.failure_threshold),
        ..KProbe::default()
    })
}

/// The instance a pod is: running until its container ends, ready when the pod's `Ready`
/// condition is True, reached at its Service's DNS name (ClusterIP), its node's address
/// (NodePort, HostPort), or its Service's load-balancer address `lb` (LoadBalancer: not ready
/// until the cluster has assigned one, as clients could not reach it).
/// The pod's resourceVersion as an [`Instance::revision`] (0, unordered, when it is not a
/// number: the API server promises none, though etcd's are).
pub fn revision_of(pod: &Pod) -> u64 {
    pod.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn instance_of(pod: &Pod, lb: Option<&str>) -> Option<Instance> {
    let name = pod.metadata.name.clone()?;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let state = if let Some(t) = terminated {
        InstanceState::Exited {
            code: Some(i64::from(t.exit_code)),
        }
    } else if phase == "Failed" || phase == "Succeeded" {
        InstanceState::Exited {
            code: Some(if phase == "Succeeded" { 0 } else { 1 }),
        }
    } else {
        InstanceState::Running
    };
    let exposure = annotations
        .get(ANNOTATION_EXPOSURE)
        .map(String::as_str)
        .unwrap_or("ClusterIP");
    let reachable = exposure != "LoadBalancer" || lb.is_some();
    // A pod being deleted (evicted, drained, deleted by hand) may still say Ready for its
    // grace period: it is never taken for a warm instance a claim could be bound to.
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let ready = state == InstanceState::Running
        && reachable
        && !deleting
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let node = match exposure {
        "NodePort" | "HostPort" => status
            .and_then(|s| s.host_ip.clone())
            .or_else(|| pod.spec.as_ref().and_then(|s| s.node_name.clone()))
            .unwrap_or_default(),
        "LoadBalancer" => lb.unwrap_or_default().to_owned(),
        _ => format!("{name}.{namespace}.svc"),
    };
    let ports = annotations
        .get(ANNOTATION_PORTS)
        .map(|s| decode_ports(s))
        .unwrap_or_default();
    let host_ports = takes_node_ports(exposure, labels.contains_key(LABEL_DEPLOYMENT));
    let revision = revision_of(pod);
    Some(Instance {
        name,
        labels: std::sync::Arc::new(labels),
        state,
        ready,
        ports,
        host_ports,
        node,
        revision,
    })
}

/// Whether the pod is exposed through a LoadBalancer Service.
pub fn is_load_balanced(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_EXPOSURE))
        .is_some_and(|e| e == "LoadBalancer")
}

/// The address a LoadBalancer Service's clients use, once the cluster has assigned one.
pub fn ingress_of(svc: &Service) -> Option<String> {
    let ingress = svc
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .clone();
    ingress.ip.or(ingress.hostname)
}

/// The claim a pod records.
pub fn claim_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CLAIM))
        .map(String::as_str)
}

/// The pod to create again under the same name (a `Restart` reset): its declared parts only,
/// with no binding and no node.
/// Cpu (millicores) and memory (bytes) as Kubernetes quantities.
fn quantities(cpu_millis: Option<u64>, memory_bytes: Option<u64>) -> BTreeMap<String, Quantity> {
    let mut q = BTreeMap::new();
    if let Some(m) = cpu_millis {
        q.insert("cpu".to_owned(), Quantity(format!("{m}m")));
    }
    if let Some(b) = memory_bytes {
        q.insert("memory".to_owned(), Quantity(b.to_string()));
    }
    q
}

/// The body of an in-place resize (`pods/NAME/resize`, a strategic merge patch: the container
/// is matched by name): requests move with limits, as the pod was made, so that its QoS class
/// stays what it was (it cannot change in place).
pub fn resize_patch(cpu_millis: Option<u64>, memory_bytes: Option<u64>) -> serde_json::Value {
    let q = quantities(cpu_millis, memory_bytes);
    serde_json::json!({"spec": {"containers": [{
        "name": "instance",
        "resources": {"limits": q, "requests": q},
    }]}})
}

/// Stops a pod and keeps it, as `docker stop` does a container: an active deadline already
/// past makes the kubelet stop its container (SIGTERM, the grace period, SIGKILL) and mark it
/// `Failed` (`DeadlineExceeded`); the pod stays, with its logs and status, until it is started
/// again (made anew) or removed. The deadline is mutable on a running pod, and may only go down.
pub fn stopping_patch() -> serde_json::Value {
    serde_json::json!({"spec": {"activeDeadlineSeconds": 1}})
}

pub fn fresh_copy(pod: &Pod) -> Pod {
    let mut labels = pod.metadata.labels.clone().unwrap_or_default();
    for k in poolkeeper_runtime::RESET_CLEARS {
        labels.remove(k);
    }
    let mut spec = pod.spec.clone().unwrap_or_default();
    spec.node_name = None;
    // What a stop set (see `stopping_patch`): the fresh pod runs until stopped again.
    spec.active_deadline_seconds = None;
    Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: pod.metadata.annotations.clone(),
            owner_references: pod.metadata.owner_references.clone(),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use poolkeeper_kinds::{HttpGetProbe, PodOverrides, Protocol, Toleration};
    use poolkeeper_runtime::{LABEL_MANAGED, LABEL_POOL};

    use super::*;

    fn spec(exposure: Option<Exposure>) -> InstanceSpec {
        let labels = Arc::new(BTreeMap::from([
            (LABEL_MANAGED.into(), "true".into()),
            (LABEL_POOL.into(), "web".into()),
        ]));
        InstanceSpec {
            command: vec!["serve".into()],
            env: BTreeMap::from([("A".into(), "1".into())]),
            ports: vec![PortBinding {
                name: "http".into(),
                container_port: 80,
                host_port: 30080,
                protocol: Protocol::Tcp,
            }],
            container_ports: vec![ContainerPort {
                name: "http".into(),
                container_port: 80,
                protocol: Protocol::Tcp,
            }],
            exposure,
            cpu_millis: Some(500),
            memory_bytes: Some(64 << 20),
            readiness: Some(Probe {
                http_get: Some(HttpGetProbe {
                    path: "/healthz".into(),
                    port: PortRef::Name("http".into()),
                }),
                tcp_socket: None,
                exec: None,
                initial_delay_seconds: None,
                period_seconds: Some(1),
                timeout_seconds: None,
                failure_threshold: None,
            }),
            pull_policy: PullPolicy::Never,
            ..InstanceSpec::plain("web-a1", "nginx:1", labels)
        }
    }

    #[test]
    fn a_pod_carries_the_labels_the_owner_the_probe_and_a_restricted_security_context() {
        let owner = Owner {
            api_version: "poolkeeper.dev/v1alpha1".into(),
            kind: "Pool".into(),
            name: "web".into(),
            uid: "u-1".into(),
        };
        let pod = pod_for(&spec(None), "team", "ctl", Some(&owner)).expect("pod");
        let labels = pod.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[LABEL_MANAGED], "true");
        assert_eq!(labels[LABEL_POOL], "web");
        assert_eq!(labels[LABEL_CONTROLLER], "ctl");
        assert_eq!(labels[POD_NAME_LABEL], "web-a1");
        let refs = pod.metadata.owner_references.as_ref().expect("owner");
        assert_eq!(
            (refs[0].kind.as_str(), refs[0].uid.as_str()),
            ("Pool", "u-1")
        );
        let ps = pod.spec.as_ref().expect("spec");
        assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
        assert_eq!(ps.automount_service_account_token, Some(false));
        assert_eq!(ps.enable_service_links, Some(false));
        let c = &ps.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["serve".to_owned()][..]));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Never"));
        let probe = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
        assert_eq!(probe.map(|h| h.port.clone()), Some(IntOrString::Int(80)));
        let res = c.resources.as_ref().expect("resources");
        assert_eq!(
            res.limits.as_ref().map(|l| l["cpu"].0.as_str()),
            Some("500m")
        );
        assert_eq!(res.requests, res.limits);
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert!(
            !caps
                .add
                .as_ref()
                .expect("kept")
                .contains(&"NET_RAW".to_owned())
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        // ClusterIP: no host port on the pod.
        assert_eq!(c.ports.as_ref().map(|p| p[0].host_port), Some(None));
    }

    #[test]
    fn declared_capabilities_replace_the_baseline_and_overrides_reach_the_pod() {
        let mut s = spec(Some(Exposure::HostPort));
        s.capabilities = Some(vec!["NET_BIND_SERVICE".into()]);
        s.pod_overrides = Some(PodOverrides {
            node_selector: BTreeMap::from([("disk".into(), "ssd".into())]),
            tolerations: vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            }],
            service_account_name: Some("runner".into()),
            image_pull_secrets: vec!["regcred".into()],
        });
        let pod = pod_for(&s, "team", "ctl", None).expect("pod");
        assert!(pod.metadata.owner_references.is_none());
        let ps = pod.spec.as_ref().expect("spec");
        let c = &ps.containers[0];
        let caps = c
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref());
        assert_eq!(
            caps.and_then(|c| c.add.clone()),
            Some(vec!["NET_BIND_SERVICE".to_owned()])
        );
        assert_eq!(c.ports.as_ref().map(|p| p[0].host_port), Some(Some(30080)));
        assert_eq!(
            ps.node_selector.as_ref().map(|n| n["disk"].as_str()),
            Some("ssd")
        );
        assert_eq!(ps.service_account_name.as_deref(), Some("runner"));
        assert_eq!(
            ps.image_pull_secrets.as_ref().map(|s| s[0].name.as_str()),
            Some("regcred")
        );
        assert!(
            service_for(&s, "team", &pod).is_none(),
            "HostPort makes no Service"
        );
    }

    #[test]
    fn each_exposure_gives_its_service_and_endpoint() {
        let mut pod = pod_for(&spec(None), "team", "ctl", None).expect("pod");
        pod.metadata.uid = Some("pod-uid".into());
        let svc = service_for(&spec(None), "team", &pod).expect("service");
        let ss = svc.spec.as_ref().expect("spec");
        assert_eq!(ss.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            ss.selector.as_ref().map(|s| s[POD_NAME_LABEL].as_str()),
            Some("web-a1")
        );
        let refs = svc
            .metadata
            .owner_references
            .as_ref()
            .expect("owned by its pod");
        assert_eq!(
            (refs[0].kind.as_str(), refs[0].uid.as_str()),
            ("Pod", "pod-uid")
        );
        pod.metadata.namespace = Some("team".into());
        let i = instance_of(&pod, None).expect("instance");
        assert_eq!(i.node, "web-a1.team.svc");
        assert_eq!(
            i.ports[0].host_port, 80,
            "a ClusterIP client uses the container port"
        );
        assert!(!i.host_ports, "a Service's port takes nothing on a node");

        let np = spec(Some(Exposure::NodePort));
        let pod = pod_for(&np, "team", "ctl", None).expect("pod");
        let svc = service_for(&np, "team", &pod).expect("service");
        let port = &svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .expect("ports")[0];
        assert_eq!(port.node_port, Some(30080));
        let mut pod = pod;
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            host_ip: Some("10.0.0.7".into()),
            ..Default::default()
        });
        let i = instance_of(&pod, None).expect("instance");
        assert_eq!((i.node.as_str(), i.ports[0].host_port), ("10.0.0.7", 30080));
        assert!(i.host_ports, "a node port is the node's");
    }

    #[test]
    fn a_pod_is_ready_only_with_its_ready_condition_and_exited_when_its_container_ended() {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodStatus,
        };
        let mut pod = pod_for(&spec(None), "team", "ctl", None).expect("pod");
        pod.metadata.resource_version = Some("42".into());
        let i = instance_of(&pod, None).expect("instance");
        assert_eq!(
            (i.state, i.ready, i.revision),
            (InstanceState::Running, false, 42)
        );
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(instance_of(&pod, None).expect("instance").ready);
        // Being deleted: not ready, whatever its condition says in its grace period.
        pod.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(!instance_of(&pod, None).expect("instance").ready);
        pod.metadata.deletion_timestamp = None;
        if let Some(s) = pod.status.as_mut() {
            s.phase = Some("Failed".into());
            s.container_statuses = Some(vec![ContainerStatus {
                name: "instance".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 3,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        let i = instance_of(&pod, None).expect("instance");
        assert_eq!(
            (i.state, i.ready),
            (InstanceState::Exited { code: Some(3) }, false)
        );
    }

    #[test]
    fn a_fresh_copy_keeps_the_declaration_and_drops_binding_node_and_status() {
        let mut pod = pod_for(&spec(None), "team", "ctl", None).expect("pod");
        if let Some(l) = pod.metadata.labels.as_mut() {
            l.insert(LABEL_CLAIM.into(), "c1".into());
        }
        pod.metadata.uid = Some("old".into());
        pod.metadata.resource_version = Some("9".into());
        if let Some(s) = pod.spec.as_mut() {
            s.node_name = Some("n1".into());
        }
        let fresh = fresh_copy(&pod);
        assert_eq!(claim_of(&pod), Some("c1"));
        assert_eq!(claim_of(&fresh), None);
        assert!(fresh.metadata.uid.is_none() && fresh.metadata.resource_version.is_none());
        assert!(fresh.spec.as_ref().expect("spec").node_name.is_none());
        assert_eq!(
            fresh
                .metadata
                .labels
                .as_ref()
                .map(|l| l[LABEL_POOL].as_str()),
            Some("web")
        );
    }

    #[test]
    fn a_deployments_container_mounts_claims_joins_its_network_and_refuses_host_paths() {
        let labels = Arc::new(BTreeMap::from([
            (LABEL_MANAGED.into(), "true".into()),
            (LABEL_DEPLOYMENT.into(), "shop".into()),
            (LABEL_CONTAINER.into(), "db".into()),
        ]));
        let mut s = InstanceSpec::plain("shop-db", "postgres", labels);
        s.network = Some("shop_default".into());
        s.ports = vec![PortBinding {
            name: "5432/tcp".into(),
            container_port: 5432,
            host_port: 15432,
            protocol: Protocol::Tcp,
        }];
        s.volumes.insert(
            "shop_data".into(),
            poolkeeper_kinds::VolumeMount {
                bind: "/var/lib/data".into(),
                mode: VolumeMode::Ro,
            },
        );
        let pod = pod_for(&s, "team", "ctl", None).expect("pod");
        let ps = pod.spec.as_ref().expect("spec");
        let claim = ps
            .volumes
            .as_ref()
            .and_then(|v| v[0].persistent_volume_claim.clone());
        assert_eq!(claim.map(|c| c.claim_name), Some("shop-data".to_owned()));
        let m = &ps.containers[0].volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            ("/var/lib/data", Some(true))
        );
        let labels = pod.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels[NETWORK_LABEL], "shop_default");
        assert!(
            service_for(&s, "team", &pod).is_none(),
            "no per-instance Service"
        );
        let svc = container_service(&s, "team").expect("the container's Service");
        assert_eq!(svc.metadata.name.as_deref(), Some("db"));
        let ss = svc.spec.expect("spec");
        assert_eq!(ss.cluster_ip.as_deref(), Some("None"));
        assert_eq!(
            ss.selector.as_ref().map(|x| x[LABEL_CONTAINER].as_str()),
            Some("db")
        );
        let np = network_policy("shop_default", "team");
        assert_eq!(np.metadata.name.as_deref(), Some("network-shop-default"));
        let rule = &np
            .spec
            .as_ref()
            .and_then(|s| s.ingress.clone())
            .expect("ingress")[0];
        let from = rule.from.as_ref().and_then(|f| f[0].pod_selector.clone());
        assert_eq!(
            from.and_then(|p| p.match_labels)
                .map(|l| l[NETWORK_LABEL].clone()),
            Some("shop_default".to_owned())
        );
        let published = published_policy(&s, "team").expect("published ports admitted");
        let rule = &published.spec.and_then(|s| s.ingress).expect("ingress")[0];
        assert!(rule.from.is_none(), "from anywhere");
        assert_eq!(
            rule.ports.as_ref().and_then(|p| p[0].port.clone()),
            Some(IntOrString::Int(5432))
        );
        let pvc = pvc_for("shop_data", "team", "shop", "ctl");
        assert_eq!(pvc.metadata.name.as_deref(), Some("shop-data"));

        s.volumes.clear();
        s.volumes.insert(
            "/srv/data".into(),
            poolkeeper_kinds::VolumeMount {
                bind: "/data".into(),
                mode: VolumeMode::Rw,
            },
        );
        let e = pod_for(&s, "team", "ctl", None).expect_err("refused");
        assert!(e.to_string().contains("host paths are refused"), "{e}");
    }
}
