//! Validation beyond what the types enforce: per object (ranges, durations, quantities,
//! references inside one spec) and across objects (missing references, overlapping ports).
//!
//! Per-object errors make the object invalid (a source keeps its last valid version). Cross-object
//! errors are facts about the current set: `validate` reports them as errors, while the running
//! controller shows them as conditions, since the missing piece may be declared a moment later.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::units::{check_name, parse_cpu_millis, parse_duration, parse_memory_bytes};
use crate::{
    ClaimSpec, ContainerSpec, DeploymentSpec, FieldError, Kind, ObjKey, Object, PoolSpec, Probe,
    ResetPolicy, Resources, Spec, UserSpec,
};

pub fn validate_object(name: &str, spec: &Spec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Err(e) = check_name(name) {
        errs.push(FieldError::new("metadata.name", e));
    }
    match spec {
        Spec::Pool(p) => {
            check_pool_name(name, &mut errs);
            validate_pool(p, &mut errs);
        }
        Spec::Claim(c) => validate_claim(c, &mut errs),
        Spec::User(u) => validate_user(u, &mut errs),
        Spec::Deployment(d) => {
            validate_deployment(d, &mut errs);
            check_instance_names(name, d, &mut errs);
        }
    }
    errs
}

/// The longest pool name: its instances are named `NAME-xxxxx`, which Kubernetes takes as a
/// label value and a Service name (at most 63 characters).
pub const MAX_POOL_NAME: usize = 57;

/// A pool's name also names its instances, which on Kubernetes name Services (DNS-1035
/// labels: a letter first) and label values: the same rules in files and CRDs, so that a pool
/// runs on either runtime.
fn check_pool_name(name: &str, errs: &mut Vec<FieldError>) {
    if name.len() > MAX_POOL_NAME && name.len() <= 63 {
        errs.push(FieldError::new(
            "metadata.name",
            format!(
                "name {name:?} is longer than {MAX_POOL_NAME} characters (the instances of a pool are named NAME-xxxxx, at most 63)"
            ),
        ));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        errs.push(FieldError::new(
            "metadata.name",
            format!("name {name:?} must start with a letter (the instances of a pool name Kubernetes Services)"),
        ));
    }
}

/// A deployment's instances are named `DEPLOYMENT-CONTAINER` (and `-N` with replicas), a label
/// value on Kubernetes (at most 63 characters); a container's name names a Service there (a
/// letter first).
fn check_instance_names(name: &str, d: &DeploymentSpec, errs: &mut Vec<FieldError>) {
    for (i, c) in d.containers.iter().enumerate() {
        let at = format!("spec.containers[{i}].name");
        if c.name.starts_with(|c: char| c.is_ascii_digit()) {
            errs.push(FieldError::new(
                &at,
                format!(
                    "container name {:?} must start with a letter (it names a Kubernetes Service)",
                    c.name
                ),
            ));
        }
        let longest = if c.replicas > 1 {
            format!("{name}-{}-{}", c.name, c.replicas - 1)
        } else {
            format!("{name}-{}", c.name)
        };
        if longest.len() > 63 && c.name.len() <= 63 {
            errs.push(FieldError::new(
                &at,
                format!(
                    "an instance name of deployment {name:?} is longer than 63 characters (the instances of a container are named DEPLOYMENT-CONTAINER, and -N with replicas): {longest}"
                ),
            ));
        }
    }
}

/// The number of instances a pool may have: `max`; else as many as `hostPorts` can serve;
/// else no cap (claims are still bounded by users' quotas).
pub fn pool_max(p: &PoolSpec) -> u32 {
    if let Some(m) = p.max {
        return m;
    }
    match (p.host_ports, p.template.ports.len()) {
        (Some(r), n) if n > 0 => r.len() / n as u32,
        _ => u32::MAX,
    }
}

fn validate_pool(p: &PoolSpec, errs: &mut Vec<FieldError>) {
    let max = pool_max(p);
    if p.warm > max {
        errs.push(FieldError::new(
            "spec.warm",
            format!("warm ({}) is greater than max ({max})", p.warm),
        ));
    }
    if let Some(a) = &p.autoscale {
        check_autoscale(a, max, errs);
    }
    let t = &p.template;
    if t.image.trim().is_empty() {
        errs.push(FieldError::new(
            "spec.template.image",
            "image must not be empty",
        ));
    }
    let mut port_names = BTreeSet::new();
    for (i, port) in t.ports.iter().enumerate() {
        if let Err(e) = check_name(&port.name) {
            errs.push(FieldError::new(format!("spec.template.ports[{i}].name"), e));
        }
        if !port_names.insert(port.name.as_str()) {
            errs.push(FieldError::new(
                format!("spec.template.ports[{i}].name"),
                format!("duplicate port name {:?}", port.name),
            ));
        }
        if port.container_port == 0 {
            errs.push(FieldError::new(
                format!("spec.template.ports[{i}].containerPort"),
                "port must be between 1 and 65535",
            ));
        }
    }
    if let Some(r) = &p.host_ports {
        let n = t.ports.len();
        if r.start == 0 || r.end < r.start {
            errs.push(FieldError::new(
                "spec.hostPorts",
                format!(
                    "invalid range {}-{}: need 1 <= start <= end <= 65535",
                    r.start, r.end
                ),
            ));
        } else if n == 0 {
            errs.push(FieldError::new(
                "spec.hostPorts",
                "hostPorts is set but the template declares no ports",
            ));
        } else if u64::from(max) * n as u64 > u64::from(r.len()) {
            errs.push(FieldError::new(
                "spec.hostPorts",
                format!(
                    "range {}-{} holds {} ports, but max ({max}) instances x {n} port(s) \
                     need {}",
                    r.start,
                    r.end,
                    r.len(),
                    u64::from(max) * n as u64
                ),
            ));
        }
    }
    if let Some(e @ (crate::Exposure::NodePort | crate::Exposure::HostPort)) = p.exposure
        && p.host_ports.is_none()
    {
        errs.push(FieldError::new(
            "spec.exposure",
            format!(
                "exposure {} takes its ports from spec.hostPorts, which is not set",
                e.as_str()
            ),
        ));
    }
    if let Some(o) = &t.pod_overrides {
        for (i, tol) in o.tolerations.iter().enumerate() {
            if let Some(op) = tol.operator.as_deref()
                && op != "Exists"
                && op != "Equal"
            {
                errs.push(FieldError::new(
                    format!("spec.template.podOverrides.tolerations[{i}].operator"),
                    format!("operator {op:?} must be Exists or Equal"),
                ));
            }
            if let Some(e) = tol.effect.as_deref()
                && !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&e)
            {
                errs.push(FieldError::new(
                    format!("spec.template.podOverrides.tolerations[{i}].effect"),
                    format!("effect {e:?} must be NoSchedule, PreferNoSchedule or NoExecute"),
                ));
            }
        }
    }
    check_resources(t.resources.as_ref(), "spec.template.resources", errs);
    check_resources(p.claim_resources.as_ref(), "spec.claimResources", errs);
    if let Some(c) = &p.claim_resources {
        // A claim changes what the template declares (a pod's QoS class cannot change in place).
        let declared = t.resources.clone().unwrap_or_default();
        for (field, bounded, base) in [
            ("cpu", c.cpu.is_some(), declared.cpu.is_some()),
            ("memory", c.memory.is_some(), declared.memory.is_some()),
        ] {
            if bounded && !base {
                errs.push(FieldError::new(
                    format!("spec.claimResources.{field}"),
                    format!(
                        "claims may change {field} only where spec.template.resources.{field} \
                         declares it"
                    ),
                ));
            }
        }
    }
    if let Some(probe) = &t.readiness {
        check_probe(probe, &port_names, "spec.template.readiness", errs);
    }
    if let Some(ssh) = &t.ssh {
        let known = match &ssh.port {
            crate::PortRef::Name(n) => t.ports.iter().any(|p| &p.name == n),
            crate::PortRef::Number(n) => t.ports.iter().any(|p| p.container_port == *n),
        };
        if !known {
            errs.push(FieldError::new(
                "spec.template.ssh.port",
                "ssh.port names no port declared in spec.template.ports",
            ));
        }
        if crate::units::check_name(&ssh.user).is_err() {
            errs.push(FieldError::new(
                "spec.template.ssh.user",
                format!("{:?} is not a valid user name", ssh.user),
            ));
        }
    }
    if let Some(files) = &t.files
        && !files.mount_path.starts_with('/')
    {
        errs.push(FieldError::new(
            "spec.template.files.mountPath",
            format!("mountPath {:?} must be an absolute path", files.mount_path),
        ));
    }
    if p.reset == ResetPolicy::Exec && p.reset_command.is_empty() {
        errs.push(FieldError::new(
            "spec.resetCommand",
            "reset is Exec but resetCommand is empty",
        ));
    }
    if p.reset != ResetPolicy::Exec && !p.reset_command.is_empty() {
        errs.push(FieldError::new(
            "spec.resetCommand",
            "resetCommand is only used with reset: Exec",
        ));
    }
    if let Some(ttl) = &p.claim_ttl
        && let Err(e) = parse_duration(ttl)
    {
        errs.push(FieldError::new("spec.claimTTL", e));
    }
}

fn check_resources(r: Option<&Resources>, path: &str, errs: &mut Vec<FieldError>) {
    let Some(r) = r else { return };
    if let Some(cpu) = &r.cpu
        && let Err(e) = parse_cpu_millis(cpu)
    {
        errs.push(FieldError::new(format!("{path}.cpu"), e));
    }
    if let Some(mem) = &r.memory
        && let Err(e) = parse_memory_bytes(mem)
    {
        errs.push(FieldError::new(format!("{path}.memory"), e));
    }
}

fn check_probe(probe: &Probe, port_names: &BTreeSet<&str>, path: &str, errs: &mut Vec<FieldError>) {
    let set = [
        probe.http_get.is_some(),
        probe.tcp_socket.is_some(),
        probe.exec.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        errs.push(FieldError::new(
            path,
            format!("exactly one of httpGet, tcpSocket, exec must be set (found {set})"),
        ));
    }
    let port = probe
        .http_get
        .as_ref()
        .map(|h| (&h.port, "httpGet"))
        .or(probe.tcp_socket.as_ref().map(|t| (&t.port, "tcpSocket")));
    if let Some((crate::PortRef::Name(n), which)) = port
        && !port_names.contains(n.as_str())
    {
        errs.push(FieldError::new(
            format!("{path}.{which}.port"),
            format!("no declared port is named {n:?}"),
        ));
    }
    if let Some(exec) = &probe.exec
        && exec.command.is_empty()
    {
        errs.push(FieldError::new(
            format!("{path}.exec.command"),
            "command must not be empty",
        ));
    }
}

fn validate_claim(c: &ClaimSpec, errs: &mut Vec<FieldError>) {
    if c.pool.is_empty() {
        errs.push(FieldError::new("spec.pool", "pool must not be empty"));
    }
    if c.user.is_empty() {
        errs.push(FieldError::new("spec.user", "user must not be empty"));
    }
    if let Some(ttl) = &c.ttl
        && let Err(e) = parse_duration(ttl)
    {
        errs.push(FieldError::new("spec.ttl", e));
    }
    // Each path as a copy writes it; two that name one file, or a file where another path
    // makes a folder, would make what lands depend on the order of writing.
    let mut normal: BTreeMap<String, &str> = BTreeMap::new();
    for path in c.files.keys() {
        let shown = format!("spec.files.{path}");
        match normal_relative_path(path) {
            Err(e) => errs.push(FieldError::new(shown, e)),
            Ok(n) => {
                if let Some(other) = normal.get(&n) {
                    errs.push(FieldError::new(
                        shown,
                        format!("file path {path:?} names the same file as {other:?}"),
                    ));
                } else {
                    normal.insert(n, path);
                }
            }
        }
    }
    for (n, path) in &normal {
        if let Some(file) = (n.match_indices('/'))
            .map(|(at, _)| &n[..at])
            .find(|p| normal.contains_key(*p))
        {
            errs.push(FieldError::new(
                format!("spec.files.{path}"),
                format!("file path {path:?} is inside {file:?}, which is a file"),
            ));
        }
    }
    check_resources(c.resources.as_ref(), "spec.resources", errs);
}

/// The longest name of one folder or file in a claim's file path (most file systems').
const MAX_PATH_SEGMENT: usize = 255;
/// The longest claim file path: with the mount path it stays well under the 4096 bytes a
/// path may have.
const MAX_PATH: usize = 1024;

/// A claim's file path as a copy writes it under the mount path (`./a`, `a/./b` and `a/.` are
/// `a`, `a/b` and `a`), or why it cannot be one: absolute, leaving the mount path (`..`), an
/// empty segment (`a//b`, `a/`), naming nothing, a control character, or a name too long for
/// a file system.
/// Anything a copy would fail on is refused here, where the claim's author sees it: a copy
/// that fails takes the instance out of service.
pub fn normal_relative_path(path: &str) -> Result<String, String> {
    if path.starts_with('/') {
        return Err(format!(
            "file path {path:?} must be relative to the mount path"
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(format!(
            "file path {path:?} must not contain control characters"
        ));
    }
    let mut parts = Vec::new();
    for seg in path.split('/') {
        match seg {
            "." => {}
            // As the CRD's admission rule says it.
            "" | ".." => {
                return Err(format!(
                    "file path {path:?} must not contain '..' or empty segments"
                ));
            }
            long if long.len() > MAX_PATH_SEGMENT => return Err(too_long(path)),
            name => parts.push(name),
        }
    }
    if parts.is_empty() {
        return Err(format!("file path {path:?} names no file"));
    }
    if path.len() > MAX_PATH {
        return Err(too_long(path));
    }
    Ok(parts.join("/"))
}

fn too_long(path: &str) -> String {
    format!(
        "file path {path:?} is too long (names of at most {MAX_PATH_SEGMENT} bytes, {MAX_PATH} \
         bytes in all)"
    )
}

fn validate_user(u: &UserSpec, errs: &mut Vec<FieldError>) {
    for (i, key) in u.ssh_keys.iter().enumerate() {
        let kind = key.split_whitespace().next().unwrap_or("");
        if !(kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-")) {
            errs.push(FieldError::new(
                format!("spec.sshKeys[{i}]"),
                "not an OpenSSH public key (expected e.g. \"ssh-ed25519 AAAA... comment\")",
            ));
        }
    }
    if let Some(h) = &u.token_sha256
        && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        errs.push(FieldError::new(
            "spec.tokenSha256",
            "must be the 64 hex digits of a SHA-256 (`printf %s TOKEN | sha256sum`), not the token",
        ));
    }
    if let Some(h) = &u.password_hash {
        if !is_argon2id_phc(h) {
            errs.push(FieldError::new("spec.passwordHash", PASSWORD_HASH_MESSAGE));
        } else if !argon2_cost_allowed(h) {
            errs.push(FieldError::new("spec.passwordHash", PASSWORD_COST_MESSAGE));
        }
    }
    match &u.token_secret_file {
        Some(_) if u.token_sha256.is_some() => errs.push(FieldError::new(
            "spec.tokenSecretFile",
            "give tokenSha256 or tokenSecretFile, not both",
        )),
        Some(f) if f.trim().is_empty() => {
            errs.push(FieldError::new("spec.tokenSecretFile", "must name a file"))
        }
        _ => {}
    }
    if let Some(r) = &u.token_secret_ref {
        if u.token_sha256.is_some() || u.token_secret_file.is_some() {
            errs.push(FieldError::new(
                "spec.tokenSecretRef",
                "give one of tokenSha256, tokenSecretFile and tokenSecretRef",
            ));
        }
        if r.name.trim().is_empty() || r.key.trim().is_empty() {
            errs.push(FieldError::new(
                "spec.tokenSecretRef",
                "must name a Secret and a key",
            ));
        }
    }
}

/// What `spec.passwordHash` must look like (also the CRD's rule).
pub const PASSWORD_HASH_MESSAGE: &str = "must be an argon2id hash in the PHC format ($argon2id$v=19$m=...,t=...,p=...$SALT$HASH; `poolkeeper user passwd NAME` makes one), not the password";

/// What a `spec.passwordHash` whose parameters ask too much of the console is told.
pub const PASSWORD_COST_MESSAGE: &str = "the argon2id parameters must be m=32..65536 (KiB), t=1..10 and p=1..4, given as m=...,t=...,p=...: the console checks each sign-in against them (`poolkeeper user passwd NAME` makes m=19456,t=2,p=1)";

/// The most memory (KiB), passes and lanes a password hash may ask of one check. The hash
/// carries its own parameters, and a user may set their own hash: without a bound, one hash
/// with m=4294967295 made every sign-in attempt under that name allocate 4 TiB.
const ARGON2_MAX_M_KIB: u32 = 65_536;
const ARGON2_MIN_M_KIB: u32 = 32;

/// The regular expression a `passwordHash` matches: its shape and the bounds of its parameters
/// (the CRD's rule and the OpenAPI document's pattern; [`argon2_cost_allowed`] says the same).
/// A macro, so that the CRD's rule is made of it at compile time.
#[macro_export]
macro_rules! password_hash_pattern {
    () => {
        "^[$]argon2id[$]v=[0-9]+[$]m=(3[2-9]|[4-9][0-9]|[1-9][0-9]{2,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-6]),t=([1-9]|10),p=[1-4][$][A-Za-z0-9+/]+[$][A-Za-z0-9+/]+$"
    };
}

/// See [`password_hash_pattern`].
pub const PASSWORD_HASH_PATTERN: &str = password_hash_pattern!();
const ARGON2_MAX_T: u32 = 10;
const ARGON2_MAX_P: u32 = 4;

/// Whether an argon2id PHC string's parameters are exactly `m=M,t=T,p=P` within the bounds
/// above, and at least 32 KiB (argon2's own floor is 8 KiB per lane, up to 4 lanes). The same
/// bounds are the pattern of [`PASSWORD_HASH_PATTERN`].
pub fn argon2_cost_allowed(h: &str) -> bool {
    let Some(params) = h.split('$').nth(3) else {
        return false;
    };
    let mut m = None;
    let mut t = None;
    let mut p = None;
    for kv in params.split(',') {
        let Some((k, v)) = kv.split_once('=') else {
            return false;
        };
        let Ok(v) = v.parse::<u32>() else {
            return false;
        };
        let slot = match k {
            "m" => &mut m,
            "t" => &mut t,
            "p" => &mut p,
            _ => return false,
        };
        if slot.replace(v).is_some() {
            return false;
        }
    }
    match (m, t, p) {
        (Some(m), Some(t), Some(p)) => {
            (1..=ARGON2_MAX_P).contains(&p)
                && (1..=ARGON2_MAX_T).contains(&t)
                && (ARGON2_MIN_M_KIB..=ARGON2_MAX_M_KIB).contains(&m)
        }
        _ => false,
    }
}

/// An argon2id PHC string's shape: `$argon2id$v=19$PARAMS$SALT$HASH` (whether its parameters
/// verify is the console's to find when it checks a password).
pub fn is_argon2id_phc(h: &str) -> bool {
    let parts: Vec<&str> = h.split('$').collect();
    let b64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    };
    h.len() <= 512
        && parts.len() == 6
        && parts[0].is_empty()
        && parts[1] == "argon2id"
        && parts[2].starts_with("v=")
        && parts[3].starts_with("m=")
        && b64(parts[4])
        && b64(parts[5])
}

fn validate_deployment(d: &DeploymentSpec, errs: &mut Vec<FieldError>) {
    if d.containers.is_empty() {
        errs.push(FieldError::new(
            "spec.containers",
            "a deployment needs at least one container",
        ));
    }
    if let Some(net) = &d.network
        && let Err(e) = check_name(net)
    {
        errs.push(FieldError::new("spec.network", e));
    }
    let names: BTreeMap<&str, usize> = d
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    let mut seen = BTreeSet::new();
    for (i, c) in d.containers.iter().enumerate() {
        let base = format!("spec.containers[{i}]");
        if let Err(e) = check_name(&c.name) {
            errs.push(FieldError::new(format!("{base}.name"), e));
        }
        if !seen.insert(c.name.as_str()) {
            errs.push(FieldError::new(
                format!("{base}.name"),
                format!("duplicate container name {:?}", c.name),
            ));
        }
        check_container(c, &base, errs);
        for (j, dep) in c.depends_on.iter().enumerate() {
            if !names.contains_key(dep.as_str()) {
                errs.push(FieldError::new(
                    format!("{base}.dependsOn[{j}]"),
                    format!("no container named {dep:?} in this deployment"),
                ));
            } else if dep == &c.name {
                errs.push(FieldError::new(
                    format!("{base}.dependsOn[{j}]"),
                    "a container cannot depend on itself",
                ));
            }
        }
    }
    if let Some(cycle) = find_cycle(&d.containers) {
        errs.push(FieldError::new(
            "spec.containers",
            format!("dependsOn forms a cycle: {}", cycle.join(" -> ")),
        ));
    }
}

/// Parses a Docker-style port key `"80/tcp"` (protocol optional, default tcp).
pub fn parse_port_key(key: &str) -> Result<(u16, crate::Protocol), String> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{key:?} is not a port (expected e.g. \"80/tcp\")"))?;
    let proto = match proto {
        "tcp" => crate::Protocol::Tcp,
        "udp" => crate::Protocol::Udp,
        other => {
            return Err(format!(
                "unknown protocol {other:?} in {key:?} (tcp or udp)"
            ));
        }
    };
    Ok((port, proto))
}

fn check_container(c: &ContainerSpec, base: &str, errs: &mut Vec<FieldError>) {
    if c.image.trim().is_empty() {
        errs.push(FieldError::new(
            format!("{base}.image"),
            "image must not be empty",
        ));
    }
    for (key, host) in &c.ports {
        if let Err(e) = parse_port_key(key) {
            errs.push(FieldError::new(format!("{base}.ports.{key}"), e));
        }
        if *host == 0 {
            errs.push(FieldError::new(
                format!("{base}.ports.{key}"),
                "host port must be between 1 and 65535",
            ));
        }
    }
    if c.replicas == 0 {
        errs.push(FieldError::new(
            format!("{base}.replicas"),
            "replicas must be at least 1",
        ));
    }
    if c.replicas > 1 && !c.ports.is_empty() {
        errs.push(FieldError::new(
            format!("{base}.replicas"),
            "a container with fixed host ports cannot have more than one replica",
        ));
    }
    for (src, m) in &c.volumes {
        if !m.bind.starts_with('/') {
            errs.push(FieldError::new(
                format!("{base}.volumes.{src}.bind"),
                format!("mount point {:?} must be an absolute path", m.bind),
            ));
        }
    }
    check_resources(c.resources.as_ref(), &format!("{base}.resources"), errs);
    if let Some(p) = &c.readiness {
        check_probe(p, &BTreeSet::new(), &format!("{base}.readiness"), errs);
    }
    if let Some(p) = &c.liveness {
        check_probe(p, &BTreeSet::new(), &format!("{base}.liveness"), errs);
    }
    let mut trigger_names = BTreeSet::new();
    for (i, t) in c.log_triggers.iter().enumerate() {
        let at = format!("{base}.logTriggers[{i}]");
        if t.name.is_empty() || !trigger_names.insert(t.name.as_str()) {
            errs.push(FieldError::new(
                format!("{at}.name"),
                format!("trigger name {:?} must be non-empty and unique", t.name),
            ));
        }
        if t.contains.is_empty() {
            errs.push(FieldError::new(
                format!("{at}.contains"),
                "must not be empty (it would match every line)".to_owned(),
            ));
        }
        if t.quiet_seconds == Some(0) {
            errs.push(FieldError::new(
                format!("{at}.quietSeconds"),
                "must be at least 1".to_owned(),
            ));
        }
    }
}

/// A problem that involves more than one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetError {
    pub key: ObjKey,
    pub error: FieldError,
}

/// Checks references and shared resources across a consistent set of (individually valid)
/// objects.
pub fn validate_set<'a>(objects: impl IntoIterator<Item = &'a Object>) -> Vec<SetError> {
    let objects: Vec<&Object> = objects.into_iter().collect();
    let mut pools: BTreeMap<&str, &PoolSpec> = BTreeMap::new();
    let mut users: BTreeMap<&str, &UserSpec> = BTreeMap::new();
    for o in &objects {
        match &o.spec {
            Spec::Pool(p) => {
                pools.insert(&o.name, p);
            }
            Spec::User(u) => {
                users.insert(&o.name, u);
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut err = |key: ObjKey, path: &str, msg: String| {
        out.push(SetError {
            key,
            error: FieldError::new(path, msg),
        })
    };
    // Host ports: every pool range and every fixed deployment port must be disjoint.
    let mut claimed: Vec<(ObjKey, String, u16, u16)> = Vec::new();
    for o in &objects {
        match &o.spec {
            Spec::Pool(p) => {
                if let Some(r) = p.host_ports {
                    claimed.push((o.key(), "spec.hostPorts".into(), r.start, r.end));
                }
            }
            Spec::Deployment(d) => {
                for (i, c) in d.containers.iter().enumerate() {
                    for (key, host) in &c.ports {
                        let path = format!("spec.containers[{i}].ports.{key}");
                        claimed.push((o.key(), path, *host, *host));
                    }
                }
            }
            _ => {}
        }
    }
    for (i, a) in claimed.iter().enumerate() {
        for b in &claimed[..i] {
            if a.2 <= b.3 && b.2 <= a.3 {
                let what = |x: &(ObjKey, String, u16, u16)| {
                    if x.2 == x.3 {
                        format!("port {}", x.2)
                    } else {
                        format!("ports {}-{}", x.2, x.3)
                    }
                };
                err(
                    a.0.clone(),
                    &a.1,
                    format!("host {} overlap {} of {}", what(a), what(b), b.0),
                );
            }
        }
    }
    for o in &objects {
        match &o.spec {
            Spec::Claim(c) => {
                if !pools.contains_key(c.pool.as_str()) {
                    err(
                        o.key(),
                        "spec.pool",
                        format!("pool {:?} is not declared", c.pool),
                    );
                }
                if !users.contains_key(c.user.as_str()) {
                    err(
                        o.key(),
                        "spec.user",
                        format!("user {:?} is not declared", c.user),
                    );
                }
            }
            Spec::User(u) => {
                for (i, p) in u.quota.pools.iter().enumerate() {
                    if !pools.contains_key(p.as_str()) {
                        err(
                            o.key(),
                            &format!("spec.quota.pools[{i}]"),
                            format!("pool {p:?} is not declared"),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Objects declared twice (same kind and name): every occurrence after the first.
pub fn duplicates<'a>(
    objects: impl IntoIterator<Item = &'a Object>,
) -> Vec<(&'a Object, &'a Object)> {
    let mut first: HashMap<(Kind, &str), &Object> = HashMap::new();
    let mut out = Vec::new();
    for o in objects {
        match first.get(&(o.spec.kind(), o.name.as_str())) {
            Some(prev) => out.push((o, *prev)),
            None => {
                first.insert((o.spec.kind(), o.name.as_str()), o);
            }
        }
    }
    out
}

/// Returns a dependency cycle among containers, if any, as the names along it.
pub fn find_cycle(containers: &[ContainerSpec]) -> Option<Vec<String>> {
    let deps: BTreeMap<&str, &[String]> = containers
        .iter()
        .map(|c| (c.name.as_str(), c.depends_on.as_slice()))
        .collect();
    // Colours: 1 = on the current path, 2 = done.
    let mut colour: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a str,
        deps: &BTreeMap<&'a str, &'a [String]>,
        colour: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match colour.get(n) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        colour.insert(n, 1);
        path.push(n);
        for d in deps.get(n).copied().unwrap_or_default() {
            if deps.contains_key(d.as_str())
                && let Some(c) = visit(d, deps, colour, path)
            {
                return Some(c);
            }
        }
        path.pop();
        colour.insert(n, 2);
        None
    }
    for c in containers {
        if let Some(cycle) = visit(&c.name, &deps, &mut colour, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// `spec.autoscale`: every policy one that could be met, every schedule one that fires.
fn check_autoscale(a: &crate::autoscale::Autoscale, pool_max: u32, errs: &mut Vec<FieldError>) {
    use crate::autoscale::{Buffer, Cron, parse_percent, time_zone};
    let at = |f: &str| format!("spec.autoscale.{f}");
    let max = a.max.unwrap_or(pool_max);
    if let Some(m) = a.max
        && m > pool_max
    {
        errs.push(FieldError::new(
            at("max"),
            format!("max ({m}) is greater than the pool's max ({pool_max})"),
        ));
    }
    if a.min > max {
        errs.push(FieldError::new(
            at("min"),
            format!("min ({}) is greater than max ({max})", a.min),
        ));
    }
    match &a.buffer {
        Some(Buffer::Count(n)) if *n > max => errs.push(FieldError::new(
            at("buffer"),
            format!("buffer ({n}) is greater than max ({max}): it could never be kept"),
        )),
        Some(Buffer::Percent(p)) => {
            if let Err(e) = parse_percent(p) {
                errs.push(FieldError::new(at("buffer"), e));
            }
        }
        _ => {}
    }
    for (i, s) in a.schedules.iter().enumerate() {
        let f = |x: &str| at(&format!("schedules[{i}].{x}"));
        match Cron::parse(&s.cron) {
            Err(e) => errs.push(FieldError::new(f("cron"), e)),
            Ok(c) if !c.ever_fires() => errs.push(FieldError::new(
                f("cron"),
                format!("{:?} never fires (no such day)", s.cron),
            )),
            Ok(_) => {}
        }
        if let Err(e) = time_zone(s.time_zone.as_deref()) {
            errs.push(FieldError::new(f("timeZone"), e));
        }
        match crate::units::parse_duration(&s.duration) {
            Err(e) => errs.push(FieldError::new(f("duration"), e)),
            Ok(d) if d.as_secs() < 60 => errs.push(FieldError::new(
                f("duration"),
                format!("{:?}: a window lasts at least a minute", s.duration),
            )),
            Ok(_) => {}
        }
        if s.warm > max {
            errs.push(FieldError::new(
                f("warm"),
                format!("warm ({}) is greater than max ({max})", s.warm),
            ));
        }
    }
    if let Some(d) = &a.demand {
        if !(d.hit_rate > 0.0 && d.hit_rate < 1.0) {
            errs.push(FieldError::new(
                at("demand.hitRate"),
                format!(
                    "{} is not a share between 0 and 1 (1 itself no pool can promise), e.g. 0.99",
                    d.hit_rate
                ),
            ));
        }
        if let Some(w) = &d.window {
            match crate::units::parse_duration(w) {
                Err(e) => errs.push(FieldError::new(at("demand.window"), e)),
                Ok(x) if x.as_secs() < 10 => errs.push(FieldError::new(
                    at("demand.window"),
                    format!("{w:?}: at least 10s"),
                )),
                // Every arrival within it is kept.
                Ok(x) if x.as_secs() > 24 * 3600 => errs.push(FieldError::new(
                    at("demand.window"),
                    format!("{w:?}: at most 24h"),
                )),
                Ok(_) => {}
            }
        }
    }
    if let Some(c) = &a.scale_down_cooldown
        && let Err(e) = crate::units::parse_duration(c)
    {
        errs.push(FieldError::new(at("scaleDownCooldown"), e));
    }
    if a.scale_down_step == Some(0) {
        errs.push(FieldError::new(
            at("scaleDownStep"),
            "0 would never scale down: at least 1",
        ));
    }
}

#[cfg(test)]
mod object_tests {
    use super::*;

    fn c(name: &str, deps: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: "img".to_owned(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            replicas: 1,
            ..ContainerSpec::default()
        }
    }

    fn pool_errors(name: &str) -> Vec<String> {
        let spec: PoolSpec =
            serde_json::from_value(serde_json::json!({"template": {"image": "x"}, "warm": 1}))
                .expect("pool");
        (validate_object(name, &Spec::Pool(spec)).into_iter())
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect()
    }

    #[test]
    fn a_pools_name_leaves_room_for_its_instances_and_starts_with_a_letter() {
        assert!(pool_errors(&"p".repeat(MAX_POOL_NAME)).is_empty());
        let long = pool_errors(&"p".repeat(MAX_POOL_NAME + 1));
        assert!(
            long.len() == 1 && long[0].contains("longer than 57 characters"),
            "{long:?}"
        );
        let digit = pool_errors("2fa-web");
        assert!(
            digit.len() == 1 && digit[0].contains("must start with a letter"),
            "{digit:?}"
        );
        // Over 63: said once, by the general name check.
        assert_eq!(pool_errors(&"p".repeat(64)).len(), 1);
    }

    #[test]
    fn a_deployments_instance_names_fit_and_its_containers_start_with_a_letter() {
        let dep = |name: &str, cs: Vec<ContainerSpec>| {
            let d = DeploymentSpec {
                containers: cs,
                ..DeploymentSpec::default()
            };
            (validate_object(name, &Spec::Deployment(d)).into_iter())
                .map(|e| e.path)
                .collect::<Vec<_>>()
        };
        let d41 = "d".repeat(41);
        let mut many = c(&"c".repeat(20), &[]);
        many.replicas = 10;
        // 41 + 1 + 20 + "-9": 64.
        assert_eq!(
            dep(&d41, vec![many.clone()]),
            vec!["spec.containers[0].name"]
        );
        many.replicas = 9;
        assert!(dep(&"d".repeat(40), vec![many]).is_empty(), "63 fits");
        assert_eq!(
            dep("app", vec![c("1db", &[])]),
            vec!["spec.containers[0].name"]
        );
    }

    #[test]
    fn cycles_are_found_and_named() {
        let cs = [c("a", &["b"]), c("b", &["c"]), c("c", &["a"])];
        let cycle = find_cycle(&cs).expect("cycle");
        assert_eq!(cycle.first(), cycle.last());
        assert_eq!(cycle.len(), 4);
        assert!(find_cycle(&[c("a", &["b"]), c("b", &[])]).is_none());
    }
}

#[cfg(test)]
mod claim_file_tests {
    use super::*;

    fn claim_with(paths: &[&str]) -> Vec<FieldError> {
        let spec = ClaimSpec {
            pool: "web".to_owned(),
            user: "u".to_owned(),
            ttl: None,
            files: paths
                .iter()
                .map(|p| ((*p).to_owned(), "x".to_owned()))
                .collect(),
            files_from: None,
            resources: None,
        };
        validate_object("c", &Spec::Claim(spec))
    }

    fn refused(paths: &[&str]) -> Vec<String> {
        claim_with(paths).into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn plain_relative_paths_are_accepted_and_spelled_once() {
        assert!(claim_with(&["index.html", "site/a/b.txt", "site/c.txt", ".hidden"]).is_empty());
        // Paths earlier versions accepted (a copy writes them plainly) are still accepted.
        assert!(claim_with(&["./x", "c/./d", "f/."]).is_empty());
        for (path, normal) in [("./x", "x"), ("c/./d", "c/d"), ("f/.", "f")] {
            assert_eq!(normal_relative_path(path).as_deref(), Ok(normal));
        }
    }

    #[test]
    fn a_path_a_copy_would_refuse_is_refused_naming_its_field() {
        let long_name = "n".repeat(256);
        let long_path = ["d"; 600].join("/");
        for bad in [
            ".", "./", "../x", "a/../b", "a//b", "a/", "/abs", "", "a\u{0}b", "a\nb", &long_name,
            &long_path,
        ] {
            assert_eq!(
                refused(&[bad]),
                vec![format!("spec.files.{bad}")],
                "{bad:?}"
            );
        }
        assert!(claim_with(&[&"n".repeat(255)]).is_empty());
    }

    #[test]
    fn two_paths_for_one_file_or_a_file_where_another_needs_a_folder_are_refused() {
        assert_eq!(refused(&["x", "./x"]).len(), 1);
        assert_eq!(refused(&["x", "x/y"]), vec!["spec.files.x/y".to_owned()]);
        assert_eq!(refused(&["x/.", "x/y"]), vec!["spec.files.x/y".to_owned()]);
        assert_eq!(
            refused(&["a/b", "a/b/c/d"]),
            vec!["spec.files.a/b/c/d".to_owned()]
        );
        assert!(
            refused(&["ab", "a/b"]).is_empty(),
            "a name that starts alike is no folder"
        );
    }

    #[test]
    fn a_password_hash_that_asks_too_much_of_each_check_is_refused() {
        let salt_hash = "$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g";
        let with = |params: &str| format!("$argon2id$v=19${params}{salt_hash}");
        assert!(argon2_cost_allowed(&with("m=19456,t=2,p=1")));
        assert!(argon2_cost_allowed(&with("m=65536,t=10,p=4")));
        assert!(argon2_cost_allowed(&with("m=32,t=1,p=4")));
        // The pattern (CRD, OpenAPI) says the same as the check, case by case.
        let pattern = regex::Regex::new(PASSWORD_HASH_PATTERN).expect("the pattern compiles");
        for m in [
            0u32, 7, 8, 31, 32, 99, 100, 999, 1000, 9999, 10000, 59999, 60000, 64999, 65000, 65499,
            65500, 65529, 65530, 65536, 65537, 99999, 655360,
        ] {
            for t in [0u32, 1, 9, 10, 11, 100] {
                for p in [0u32, 1, 4, 5] {
                    let h = with(&format!("m={m},t={t},p={p}"));
                    assert_eq!(pattern.is_match(&h), argon2_cost_allowed(&h), "{h}");
                }
            }
        }
        for bad in [
            "m=4294967295,t=1,p=1",
            "m=65537,t=1,p=1",
            "m=19456,t=4294967295,p=1",
            "m=19456,t=11,p=1",
            "m=19456,t=2,p=5",
            "m=19456,t=0,p=1",
            "m=16,t=2,p=4",
            "m=31,t=2,p=1",
            "m=19456,t=2",
            "m=19456,t=2,p=1,p=1",
            "m=19456,t=2,p=1,keyid=x",
            "m=x,t=2,p=1",
        ] {
            let h = with(bad);
            assert!(is_argon2id_phc(&h), "{bad}: the shape is fine");
            assert!(!argon2_cost_allowed(&h), "{bad} must be refused");
        }
        let mut u = UserSpec {
            password_hash: Some(with("m=4294967295,t=1,p=1")),
            ..UserSpec::default()
        };
        let mut errs = Vec::new();
        validate_user(&u, &mut errs);
        assert!(
            errs.iter()
                .any(|e| e.path == "spec.passwordHash" && e.message == PASSWORD_COST_MESSAGE),
            "{errs:?}"
        );
        u.password_hash = Some(with("m=19456,t=2,p=1"));
        errs.clear();
        validate_user(&u, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
    }
}
