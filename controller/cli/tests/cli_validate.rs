#![allow(clippy::unwrap_used)]
//! `poolkeeper validate PATH...` as a user runs it: exit 0 and nothing on stdout when valid;
//! exit 1 and one `FILE:LINE:COL: KIND/NAME: field.path: message` line per problem otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn validate(paths: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
        .arg("validate")
        .args(paths)
        .env_remove("POOLKEEPER_LOG")
        .output()
        .unwrap()
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(dir: &Path, rel: &str, content: &str) -> PathBuf {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    p
}

fn text(lines: &[&str]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

const API: &str = "apiVersion: poolkeeper.dev/v1alpha1";

fn pool(name: &str, start: u16, end: u16) -> String {
    text(&[
        API,
        "kind: Pool",
        "metadata:",
        &format!("  name: {name}"),
        "spec:",
        "  warm: 2",
        "  template:",
        "    image: nginx",
        "    ports: [{name: http, containerPort: 80}]",
        "    resources: {cpu: 500m, memory: 256Mi}",
        &format!("  hostPorts: {{start: {start}, end: {end}}}"),
        "  claimTTL: 2h",
    ])
}

fn user(name: &str) -> String {
    text(&[
        API,
        "kind: User",
        "metadata:",
        &format!("  name: {name}"),
        "spec: {}",
    ])
}

fn claim(name: &str, pool: &str, user: &str) -> String {
    text(&[
        API,
        "kind: Claim",
        "metadata:",
        &format!("  name: {name}"),
        "spec:",
        &format!("  pool: {pool}"),
        &format!("  user: {user}"),
        "  ttl: 30m",
    ])
}

/// A folder a user could run: a pool, a user and a claim in three files, two of them in one
/// multi-document file, plus a Pod Manager config.
fn valid_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "pools/web.yaml", &pool("web", 8000, 8009));
    write(
        dir.path(),
        "people.yml",
        &format!(
            "{}---\n{}",
            user("alice"),
            claim("alice-web", "web", "alice")
        ),
    );
    write(
        dir.path(),
        "legacy/site.json",
        r#"[{"name": "nginx", "image": "nginx", "ports": {"80/tcp": 8080}},
 {"name": "redis", "image": "redis", "command": "redis-server --save ''"}]"#,
    );
    dir
}

#[test]
fn a_valid_folder_exits_0_with_nothing_on_stdout() {
    let dir = valid_folder();
    let out = validate(&[dir.path()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("4 object(s) valid"),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn validate_runs_nothing_and_writes_nothing_into_the_folder() {
    let dir = valid_folder();
    let list = |d: &Path| {
        let mut v: Vec<PathBuf> = walk(d);
        v.sort();
        v
    };
    let before = list(dir.path());
    let out = validate(&[dir.path()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(list(dir.path()), before);
    assert!(!dir.path().join(".poolkeeper").exists());
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn an_invalid_folder_exits_1_with_one_exact_line_per_problem_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a-pools.yaml",
        &format!(
            "{}---\n{}",
            pool("web", 8000, 8009),
            text(&[
                API,
                "kind: Pool",
                "metadata:",
                "  name: api",
                "spec:",
                "  tll: 1h",
                "  template:",
                "    image: nginx",
            ])
        ),
    );
    let b = write(
        dir.path(),
        "b/claims.yaml",
        &format!(
            "{}---\n{}",
            claim("c1", "nope", "ghost"),
            text(&[
                API,
                "kind: Claim",
                "metadata:",
                "  name: c2",
                "spec:",
                "  pool: web",
                "  user: ghost",
                "  ttl: 10",
            ])
        ),
    );
    let c = write(
        dir.path(),
        "c.yaml",
        &text(&[
            API,
            "kind: Pool",
            "metadata:",
            "  name: db",
            "spec:",
            "  warm: 4",
            "  max: 3",
            "  template:",
            "    image: postgres",
            "    resources:",
            "      memory: 1GB",
        ]),
    );
    let d = write(dir.path(), "d-more-pools.yaml", &pool("cache", 8005, 8014));
    let out = validate(&[dir.path()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let (a, b, c, d) = (a.display(), b.display(), c.display(), d.display());
    assert_eq!(
        stdout_lines(&out),
        vec![
            format!(
                "{a}:19:3: Pool/api: spec.tll: unknown field `tll`, expected one of template, \
                 warm, max, hostPorts, reset, resetCommand, claimTTL, pullPolicy, autoscale, exposure, claimResources"
            ),
            format!(
                "{b}:17:3: Claim/c2: spec.ttl: invalid duration \"10\": missing unit after 10 \
                 (use ms, s, m, h or d)"
            ),
            format!("{c}:6:3: Pool/db: spec.warm: warm (4) is greater than max (3)"),
            format!(
                "{c}:11:7: Pool/db: spec.template.resources.memory: invalid memory quantity \
                 \"1GB\" (expected e.g. 256Mi, 1Gi, 500M)"
            ),
            format!(
                "{d}:11:3: Pool/cache: spec.hostPorts: host ports 8005-8014 overlap ports \
                 8000-8009 of Pool/web"
            ),
            format!("{b}:6:3: Claim/c1: spec.pool: pool \"nope\" is not declared"),
            format!("{b}:7:3: Claim/c1: spec.user: user \"ghost\" is not declared"),
        ]
    );
    assert!(
        stderr(&out).contains("7 problem(s)"),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn a_duplicate_name_across_files_exits_1_naming_both_places() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.yaml", &user("alice"));
    let b = write(dir.path(), "b.yaml", &format!("---\n{}", user("alice")));
    let out = validate(&[dir.path()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout_lines(&out),
        vec![format!(
            "{}:2:1: User/alice: metadata.name: also declared at {}:1:1",
            b.display(),
            a.display()
        )]
    );
}

#[test]
fn invalid_yaml_exits_1_with_a_located_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "x.yaml", "a: b\n c: d\n");
    let out = validate(&[f.as_path()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with(&format!("{}:2:3: invalid YAML: ", f.display())),
        "{lines:#?}"
    );
}

#[test]
fn a_pod_manager_config_with_an_unknown_field_exits_1_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "web.json",
        "{\"name\": \"web\",\n \"image\": \"nginx\",\n \"restart\": \"always\"}\n",
    );
    let out = validate(&[dir.path()]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout_lines(&out),
        vec![format!(
            "{}:3:2: Deployment/web: restart: Pod Manager config: unknown field `restart`, \
             expected one of `name`, `image`, `ports`, `environment`, `command`, `volumes`",
            f.display()
        )]
    );
}

#[test]
fn several_paths_are_checked_as_one_set() {
    let dir = tempfile::tempdir().unwrap();
    let pools = write(dir.path(), "p/web.yaml", &pool("web", 8000, 8009));
    let users = write(dir.path(), "u/alice.yaml", &user("alice"));
    let claims = write(dir.path(), "c/c1.yaml", &claim("c1", "web", "alice"));
    let out = validate(&[&pools, &users, &claims]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {:?}",
        stdout_lines(&out)
    );
    assert!(out.stdout.is_empty());

    // Without the users file the claim's user is missing.
    let out = validate(&[&pools, &claims]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout_lines(&out),
        vec![format!(
            "{}:7:3: Claim/c1: spec.user: user \"alice\" is not declared",
            claims.display()
        )]
    );
}

#[test]
fn state_hidden_and_editor_files_in_a_folder_are_not_validated() {
    let dir = valid_folder();
    for junk in [
        ".poolkeeper/status.json",
        ".poolkeeper/objects/x.yaml",
        ".hidden.yaml",
        "pools/.web.yaml.swp",
        "pools/web.yaml~",
        "pools/#web.yaml#",
        "notes.txt",
    ] {
        write(dir.path(), junk, "this: [is not valid");
    }
    let out = validate(&[dir.path()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {:?}",
        stdout_lines(&out)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_missing_path_exits_1_with_a_line_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder");
    let out = validate(&[&missing]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with(&format!("{}: cannot read: ", missing.display())),
        "{lines:#?}"
    );
}

#[test]
fn a_missing_path_does_not_hide_problems_in_the_other_paths() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone.yaml");
    let c = write(dir.path(), "c.yaml", &claim("c1", "web", "alice"));
    let out = validate(&[&missing, &c]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].starts_with(&format!("{}: cannot read: ", missing.display())));
    assert_eq!(
        lines[1],
        format!(
            "{}:6:3: Claim/c1: spec.pool: pool \"web\" is not declared",
            c.display()
        )
    );
}

#[test]
fn validate_without_a_path_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_poolkeeper"))
        .arg("validate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("PATHS"), "stderr: {}", stderr(&out));
}

/// Pool `scaled` (nginx) with `spec` lines after its template, from line 7.
fn scaled_pool(spec: &[&str]) -> String {
    let mut lines = vec![
        API,
        "kind: Pool",
        "metadata:",
        "  name: scaled",
        "spec:",
        "  template: {image: nginx}",
    ];
    lines.extend_from_slice(spec);
    text(&lines)
}

#[test]
fn invalid_autoscale_policies_are_refused_with_file_line_column_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "scaled.yaml",
        &scaled_pool(&[
            "  max: 20",
            "  autoscale:",
            "    buffer: 30",
            "    schedules:",
            "    - cron: \"0 0 31 2 *\"",
            "      duration: 2h",
            "      warm: 5",
            "    - cron: \"50 8 * * 1-5\"",
            "      timeZone: Mars/Olympus",
            "      duration: 2h",
            "      warm: 5",
            "    demand: {hitRate: 1.0}",
        ]),
    );
    let out = validate(&[&f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = stdout_lines(&out);
    let want = [
        (
            "scaled.yaml:9:5: Pool/scaled: spec.autoscale.buffer:",
            "buffer (30) is greater than max (20)",
        ),
        (
            "scaled.yaml:11:7: Pool/scaled: spec.autoscale.schedules[0].cron:",
            "never fires",
        ),
        (
            "scaled.yaml:15:7: Pool/scaled: spec.autoscale.schedules[1].timeZone:",
            "unknown time zone \"Mars/Olympus\"",
        ),
        (
            "scaled.yaml:18:14: Pool/scaled: spec.autoscale.demand.hitRate:",
            "not a share between 0 and 1",
        ),
    ];
    for (at, says) in want {
        assert!(
            lines.iter().any(|l| l.contains(at) && l.contains(says)),
            "no {at:?} ... {says:?} in:\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(lines.len(), want.len(), "{}", lines.join("\n"));

    // A valid policy passes.
    let ok = write(
        dir.path(),
        "ok/scaled.yaml",
        &scaled_pool(&[
            "  warm: 1",
            "  max: 60",
            "  autoscale:",
            "    buffer: \"20%\"",
            "    min: 2",
            "    max: 50",
            "    schedules:",
            "    - {cron: \"50 8 * * 1-5\", timeZone: Europe/Paris, duration: 2h, warm: 40}",
            "    demand: {hitRate: 0.99, window: 10m}",
            "    scaleDownCooldown: 2m",
            "    scaleDownStep: 2",
        ]),
    );
    let out = validate(&[&ok]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
