//! Unit tests of the pure parts.
use std::path::Path;

use poolkeeper_kinds::Protocol;

use super::*;
use crate::containers::*;
use crate::errors::*;
use crate::labels::*;

#[test]
fn ports_round_trip_through_the_label() {
    let ports = vec![
        PortBinding {
            name: "http".into(),
            container_port: 80,
            host_port: 8000,
            protocol: Protocol::Tcp,
        },
        PortBinding {
            name: "dns".into(),
            container_port: 53,
            host_port: 0,
            protocol: Protocol::Udp,
        },
    ];
    assert_eq!(encode_ports(&ports), "http:80:8000/tcp,dns:53:0/udp");
    assert_eq!(decode_ports(&encode_ports(&ports)), ports);
    assert!(decode_ports("").is_empty());
    assert!(decode_ports("garbage,x:y:z/tcp").is_empty());
}

#[test]
fn port_in_use_messages() {
    assert_eq!(
        port_in_use(
            "driver failed programming external connectivity on endpoint x (abc): Bind for 0.0.0.0:8003 failed: port is already allocated"
        ),
        Some(8003)
    );
    assert_eq!(
        port_in_use(
            "driver failed programming external connectivity on endpoint x (abc): Error starting userland proxy: listen tcp4 0.0.0.0:8100: bind: address already in use"
        ),
        Some(8100)
    );
    assert_eq!(port_in_use("no such image"), None);
}

#[test]
fn exit_codes_from_status() {
    assert_eq!(exit_code_of(Some("Exited (137) 2 minutes ago")), Some(137));
    assert_eq!(exit_code_of(Some("Up 3 seconds")), None);
    assert_eq!(exit_code_of(None), None);
}

#[test]
fn binds_stay_under_the_root() {
    let root = Path::new("/data/state");
    assert!(within(root, Path::new("/data/state/vol/a")));
    assert!(!within(root, Path::new("/data/state/../etc")));
    assert!(!within(root, Path::new("/etc/passwd")));
    assert!(!within(root, Path::new("/data/statefoo")));
}

#[test]
fn tar_refuses_escapes_and_places_files_under_the_dir() {
    assert!(tar_of("/srv", &[("../etc/passwd".into(), vec![])]).is_err());
    assert!(tar_of("/srv", &[("/etc/passwd".into(), vec![])]).is_err());
    let t = tar_of("/srv/www/", &[("a/b.txt".into(), b"hi".to_vec())]);
    let bytes = t.unwrap_or_default();
    let mut archive = tar::Archive::new(bytes.as_slice());
    let names: Vec<String> = archive
        .entries()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.path().ok().map(|p| p.display().to_string()))
        .collect();
    assert_eq!(names, vec!["srv/www/a/b.txt".to_owned()]);
}

#[test]
fn advertise_addresses() {
    assert_eq!(
        NodeConfig::from_url("a", "unix:///var/run/docker.sock").advertise(),
        "127.0.0.1"
    );
    assert_eq!(
        NodeConfig::from_url("a", "tcp://10.1.2.3:2375").advertise(),
        "10.1.2.3"
    );
    let mut n = NodeConfig::from_url("a", "/run/d.sock");
    assert_eq!(n.normalized_url(), "unix:///run/d.sock");
    n.listen_address = Some("127.0.0.2".into());
    assert_eq!(n.advertise(), "127.0.0.2");
}

#[test]
fn files_are_shared_through_a_local_socket_only_when_running_as_root() {
    let local = NodeConfig::from_url("local", "unix:///var/run/docker.sock");
    let bare_path = NodeConfig::from_url("local", "/var/run/docker.sock");
    let remote = NodeConfig::from_url("vm", "tcp://10.0.0.2:2375");
    assert!(local.shares_files_as(true));
    assert!(bare_path.shares_files_as(true));
    // A service user cannot write into folders Docker hands the image's owner: uploads instead.
    assert!(!local.shares_files_as(false));
    assert!(!remote.shares_files_as(true));
    let forced = NodeConfig {
        shared_files: Some(true),
        ..remote.clone()
    };
    assert!(forced.shares_files_as(false));
    let off = NodeConfig {
        shared_files: Some(false),
        ..local
    };
    assert!(!off.shares_files_as(true));
}
