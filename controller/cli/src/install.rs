//! `poolkeeper install`: what a host needs to run poolkeeper as a service without Ansible: the
//! systemd unit (the very text `ansible/roles/poolkeeper/templates/poolkeeper.service.j2`
//! renders for the same values; the VM test compares them) and a first specs folder (the old
//! PaaS's four pools).

/// The values the unit is made of (the Ansible role's variables of the same names).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct UnitOptions {
    /// Where the binary is installed (`poolkeeper_binary_path`).
    #[arg(long, default_value = "/usr/local/bin/poolkeeper")]
    pub binary: String,
    /// The state folder, the only place the service writes (`poolkeeper_state_dir`).
    #[arg(long, default_value = "/var/lib/poolkeeper")]
    pub state_dir: String,
    /// The watched specs folder (`poolkeeper_specs_dir`); default: STATE_DIR/specs.
    #[arg(long)]
    pub specs_dir: Option<String>,
    /// Secrets, `config.yaml` and `poolkeeper.env` (`poolkeeper_config_dir`).
    #[arg(long, default_value = "/etc/poolkeeper")]
    pub config_dir: String,
    /// The HTTP API's address (`poolkeeper_listen`).
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub listen: String,
    /// The service's user and group.
    #[arg(long, default_value = "poolkeeper")]
    pub user: String,
    #[arg(long, default_value = "poolkeeper")]
    pub group: String,
    /// The group that may use the Docker socket.
    #[arg(long, default_value = "docker")]
    pub docker_group: String,
    /// Seconds without a watchdog ping before systemd restarts the service.
    #[arg(long, default_value_t = 30)]
    pub watchdog_sec: u32,
    /// Serve reservations by webhook, with the secret CONFIG_DIR/webhook-secret.
    #[arg(long)]
    pub webhooks: bool,
}

impl Default for UnitOptions {
    fn default() -> Self {
        UnitOptions {
            binary: "/usr/local/bin/poolkeeper".into(),
            state_dir: "/var/lib/poolkeeper".into(),
            specs_dir: None,
            config_dir: "/etc/poolkeeper".into(),
            listen: "127.0.0.1:7080".into(),
            user: "poolkeeper".into(),
            group: "poolkeeper".into(),
            docker_group: "docker".into(),
            watchdog_sec: 30,
            webhooks: false,
        }
    }
}

/// The systemd unit: `Type=notify` with a watchdog (see `notify`), restarted always, hardened
/// (`systemd-analyze security` rates it 1.3 OK; docs/vm.md).
pub fn unit(o: &UnitOptions) -> String {
    let specs = o
        .specs_dir
        .clone()
        .unwrap_or_else(|| format!("{}/specs", o.state_dir));
    let webhook = if o.webhooks {
        format!(" --webhook-secret-file {}/webhook-secret", o.config_dir)
    } else {
        String::new()
    };
    // systemd makes the state and specs folders (relative to /var/lib) when they are there.
    let state_directory = match (
        o.state_dir.strip_prefix("/var/lib/"),
        specs.strip_prefix("/var/lib/"),
    ) {
        (Some(state), Some(specs)) => {
            format!("StateDirectory={state} {specs}\nStateDirectoryMode=0750\n")
        }
        _ => String::new(),
    };
    format!(
        "\
# poolkeeper: warm container pools, claims and deployments, from a watched folder.
# The same unit as `poolkeeper install --print-unit` prints. Docs: docs/vm.md.
[Unit]
Description=poolkeeper: warm container pools from a watched folder
After=network-online.target docker.service
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
WatchdogSec={watchdog}s
User={user}
Group={group}
SupplementaryGroups={docker_group}
Environment=NO_COLOR=1
EnvironmentFile=-{config}/poolkeeper.env
ExecStart={binary} run --dir {specs} --listen {listen} --admin-token-file {config}/admin-token{webhook} $POOLKEEPER_OPTS
Restart=always
RestartSec=2s
TimeoutStartSec=90s
TimeoutStopSec=30s

# The state folder (the specs, the store, claims' files) is the only place it writes; systemd
# makes it and the specs folder if they are missing.
{state_directory}ReadWritePaths={state}
UMask=0077

# Hardening: no privileges, no devices, a read-only system, its own /tmp. The Docker socket
# (/run/docker.sock) stays reachable: no PrivateNetwork, /run visible.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateIPC=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
",
        watchdog = o.watchdog_sec,
        user = o.user,
        group = o.group,
        docker_group = o.docker_group,
        config = o.config_dir,
        binary = o.binary,
        listen = o.listen,
        state = o.state_dir,
    )
}

/// The quickstart's pools (examples/quickstart/pools.yaml).
const QUICKSTART_POOLS: &str = include_str!("../../../examples/quickstart/pools.yaml");

/// The four pool types of the old container PaaS (nginx 5, apache 3, python 3, node 2 warm, on
/// ports 8000-8399): the quickstart's pools without its ssh one, as one file for a specs folder.
pub fn specs() -> String {
    let mut out = String::from(
        "# The four pool types of the old container PaaS, with its sizes and port ranges\n\
         # (`poolkeeper install --print-specs`; the images are those e2e/build-images.sh builds).\n",
    );
    let docs = QUICKSTART_POOLS
        .split("\n---\n")
        .map(|d| {
            // The file's own heading comment belongs to the file, not to its first pool.
            d.lines()
                .skip_while(|l| l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|d| {
            ["nginx", "apache", "python", "node"]
                .iter()
                .any(|n| d.contains(&format!("\n  name: {n}\n")))
        })
        .collect::<Vec<_>>();
    out.push_str(&docs.join("\n---\n"));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_unit_is_notify_with_a_watchdog_and_runs_the_watched_folder() {
        let u = unit(&UnitOptions::default());
        for line in [
            "Type=notify",
            "WatchdogSec=30s",
            "ExecStart=/usr/local/bin/poolkeeper run --dir /var/lib/poolkeeper/specs --listen 127.0.0.1:7080 --admin-token-file /etc/poolkeeper/admin-token $POOLKEEPER_OPTS",
            "StateDirectory=poolkeeper poolkeeper/specs",
            "ReadWritePaths=/var/lib/poolkeeper",
            "CapabilityBoundingSet=",
        ] {
            assert!(u.lines().any(|l| l == line), "no line {line:?} in\n{u}");
        }
        assert!(u.ends_with("WantedBy=multi-user.target\n"));
        let hooks = unit(&UnitOptions {
            webhooks: true,
            state_dir: "/srv/pk".into(),
            ..UnitOptions::default()
        });
        assert!(hooks.contains(
            "--admin-token-file /etc/poolkeeper/admin-token --webhook-secret-file /etc/poolkeeper/webhook-secret $POOLKEEPER_OPTS"
        ));
        // Outside /var/lib, systemd does not make the folders.
        assert!(!hooks.contains("StateDirectory"), "{hooks}");
        assert!(hooks.contains("--dir /srv/pk/specs"));
    }

    #[test]
    fn the_specs_are_the_four_paas_pools_and_load() {
        let text = specs();
        let parsed =
            poolkeeper_source_dir::loader::parse_text(std::path::Path::new("pools.yaml"), &text);
        assert!(parsed.is_clean(), "{:?}", parsed.diagnostics);
        let pools: Vec<(String, u32, u16)> = parsed
            .objects
            .iter()
            .filter_map(|o| match &o.spec {
                poolkeeper_kinds::Spec::Pool(p) => Some((
                    o.name.clone(),
                    p.warm,
                    p.host_ports.as_ref().map_or(0, |r| r.start),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(parsed.objects.len(), 4);
        assert_eq!(
            pools,
            vec![
                ("nginx".to_owned(), 5, 8000),
                ("apache".to_owned(), 3, 8100),
                ("python".to_owned(), 3, 8200),
                ("node".to_owned(), 2, 8300),
            ]
        );
    }
}
