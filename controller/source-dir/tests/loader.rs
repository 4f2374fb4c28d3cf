#![allow(clippy::unwrap_used)]
//! The loader: files to objects, with every problem located as
//! `FILE:LINE:COL: KIND/NAME: field.path: message`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use poolkeeper_kinds::{Kind, Spec};
use poolkeeper_kinds::{RestartPolicy, VolumeMode, VolumeMount};
use poolkeeper_source_dir::loader::validate_paths;
use poolkeeper_source_dir::loader::{Diagnostic, ParsedFile, is_spec_file, parse_text, spec_files};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Joins lines into a file's text, so that line N of the file is `lines[N - 1]`.
fn text(lines: &[&str]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

fn parse(file: &str, lines: &[&str]) -> ParsedFile {
    parse_text(Path::new(file), &text(lines))
}

/// The single diagnostic of a file that must yield no object.
fn only_diagnostic(file: &str, lines: &[&str]) -> Diagnostic {
    let parsed = parse(file, lines);
    assert!(
        parsed.objects.is_empty(),
        "expected no object, got {:?}",
        parsed.objects
    );
    assert_eq!(
        parsed.diagnostics.len(),
        1,
        "expected one diagnostic, got {:#?}",
        parsed.diagnostics
    );
    parsed.diagnostics.into_iter().next().unwrap()
}

/// Asserts the exact `FILE:LINE:COL: KIND/NAME: field.path` prefix and a message substring.
fn assert_diag(d: &Diagnostic, prefix: &str, message_part: &str) {
    let shown = d.to_string();
    assert_eq!(
        shown,
        format!("{prefix}: {}", d.message),
        "wrong location/object/path in {shown:?}"
    );
    assert!(
        d.message.contains(message_part),
        "message of {shown:?} does not contain {message_part:?}"
    );
}

fn pod_manager(file: &str, json: &str) -> poolkeeper_kinds::DeploymentSpec {
    let parsed = parse_text(Path::new(file), json);
    assert!(
        parsed.is_clean(),
        "unexpected diagnostics: {:#?}",
        parsed.diagnostics
    );
    assert_eq!(parsed.objects.len(), 1);
    let o = parsed.objects.into_iter().next().unwrap();
    match o.spec {
        Spec::Deployment(d) => d,
        other => panic!("expected a Deployment, got {other:?}"),
    }
}

fn write(dir: &Path, rel: &str, content: &str) -> PathBuf {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    p
}

const API: &str = "apiVersion: poolkeeper.dev/v1alpha1";

fn pool_with_ports(name: &str, start: u16, end: u16) -> String {
    text(&[
        API,
        "kind: Pool",
        "metadata:",
        &format!("  name: {name}"),
        "spec:",
        "  template:",
        "    image: nginx",
        "    ports: [{name: http, containerPort: 80}]",
        &format!("  hostPorts: {{start: {start}, end: {end}}}"),
    ])
}

// ---------------------------------------------------------------------------------------------
// Unknown fields

#[test]
fn an_unknown_spec_field_is_reported_at_its_key_with_its_full_path() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  tll: 3",
            "  template:",
            "    image: nginx",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:6:3: Pool/web: spec.tll",
        "unknown field `tll`",
    );
}

#[test]
fn an_unknown_field_after_other_fields_is_reported_at_its_key() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    prts: []",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:8:5: Pool/web: spec.template.prts",
        "unknown field `prts`",
    );
}

#[test]
fn an_unknown_field_that_is_the_first_key_of_a_list_item_is_named_with_the_item_index() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    ports:",
            "      - nme: http",
            "        containerPort: 80",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:9:9: Pool/web: spec.template.ports[0].nme",
        "unknown field `nme`",
    );
}

#[test]
fn an_unknown_field_inside_the_second_list_item_is_named_with_its_index() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    ports:",
            "      - name: http",
            "        containerPort: 80",
            "      - name: ssh",
            "        containerPort: 22",
            "        protcol: TCP",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:13:9: Pool/web: spec.template.ports[1].protcol",
        "unknown field `protcol`",
    );
}

#[test]
fn an_unknown_metadata_field_is_reported_at_its_key() {
    let d = only_diagnostic(
        "user.yaml",
        &[
            API,
            "kind: User",
            "metadata:",
            "  name: alice",
            "  labelz: {}",
            "spec: {}",
        ],
    );
    assert_diag(
        &d,
        "user.yaml:5:3: User/alice: metadata.labelz",
        "unknown field `labelz`",
    );
}

#[test]
fn an_unknown_field_in_a_flow_mapping_is_reported_at_its_key() {
    let d = only_diagnostic(
        "user.yaml",
        &[
            API,
            "kind: User",
            "metadata: {name: alice}",
            "spec: {quota: {maxClaims: 2, pool: [web]}}",
        ],
    );
    assert_diag(
        &d,
        "user.yaml:4:30: User/alice: spec.quota.pool",
        "unknown field `pool`",
    );
}

// ---------------------------------------------------------------------------------------------
// Wrong types and missing fields

#[test]
fn a_wrong_type_is_reported_at_the_value() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  warm: lots",
            "  template:",
            "    image: nginx",
        ],
    );
    assert_diag(&d, "pool.yaml:6:9: Pool/web: spec.warm", "u32");
}

#[test]
fn a_negative_count_is_a_wrong_type_at_the_value() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "  max: -1",
        ],
    );
    assert_diag(&d, "pool.yaml:8:8: Pool/web: spec.max", "u32");
}

#[test]
fn a_port_out_of_range_is_reported_at_the_value_inside_the_list_item() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    ports:",
            "      - name: http",
            "        containerPort: 99999",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:10:24: Pool/web: spec.template.ports[0].containerPort",
        "u16",
    );
}

#[test]
fn an_unknown_enum_value_is_reported_at_the_value_with_the_allowed_ones() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  reset: Sometimes",
            "  template: {image: nginx}",
        ],
    );
    assert_diag(&d, "pool.yaml:6:10: Pool/web: spec.reset", "Sometimes");
    assert!(d.message.contains("Recreate"), "{d}");
}

#[test]
fn a_mapping_where_a_list_is_expected_is_reported_at_the_value() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    command: {a: b}",
        ],
    );
    assert_diag(&d, "pool.yaml:8:14: Pool/web: spec.template.command", "");
}

#[test]
fn a_missing_required_field_names_the_enclosing_mapping() {
    let d = only_diagnostic(
        "claim.yaml",
        &[
            API,
            "kind: Claim",
            "metadata:",
            "  name: c1",
            "spec:",
            "  pool: web",
        ],
    );
    assert_diag(&d, "claim.yaml:6:3: Claim/c1: spec", "missing field `user`");
}

#[test]
fn a_repeated_key_is_reported_at_the_second_one_without_library_advice() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  warm: 1",
            "  warm: 2",
            "  template: {image: nginx}",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:7:3: spec.warm",
        "duplicate mapping key: warm",
    );
    assert!(!d.message.contains("DuplicateKeyPolicy"), "{d}");
}

#[test]
fn columns_count_characters_not_bytes() {
    let d = only_diagnostic(
        "user.yaml",
        &[
            API,
            "kind: User",
            "metadata: {name: alice}",
            "spec: {email: \"\u{e9}\u{e9}\u{e9}\", quota: {maxClaims: x}}",
        ],
    );
    assert_diag(
        &d,
        "user.yaml:4:41: User/alice: spec.quota.maxClaims",
        "u32",
    );
}

#[test]
fn windows_line_endings_keep_line_numbers() {
    let t = text(&[
        API,
        "kind: User",
        "metadata: {name: alice}",
        "spec: {}",
        "---",
        API,
        "kind: User",
        "metadata: {name: bob}",
        "spec:",
        "  quota:",
        "    maxClaims: x",
    ])
    .replace('\n', "\r\n");
    let parsed = parse_text(Path::new("crlf.yaml"), &t);
    assert_eq!(parsed.objects.len(), 1);
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "crlf.yaml:11:16: User/bob: spec.quota.maxClaims",
        "u32",
    );
}

#[test]
fn a_wrong_type_in_a_json_spec_file_is_reported_at_the_value() {
    let parsed = parse_text(
        Path::new("pool.json"),
        "{\"apiVersion\": \"poolkeeper.dev/v1alpha1\", \"kind\": \"Pool\", \"metadata\": {\"name\": \"web\"},\n \"spec\": {\"template\": {\"image\": \"nginx\"}, \"warm\": \"x\"}}\n",
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "pool.json:2:51: Pool/web: spec.warm",
        "u32",
    );
}

// ---------------------------------------------------------------------------------------------
// Checks made after deserialisation, located by the index

#[test]
fn warm_greater_than_max_is_reported_at_spec_warm() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "  max: 2",
            "  warm: 5",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:9:3: Pool/web: spec.warm",
        "warm (5) is greater than max (2)",
    );
}

#[test]
fn a_user_with_both_a_token_digest_and_a_token_file_is_reported_at_the_file() {
    let d = only_diagnostic(
        "user.yaml",
        &[
            API,
            "kind: User",
            "metadata:",
            "  name: alice",
            "spec:",
            "  tokenSha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "  tokenSecretFile: secrets/alice.token",
        ],
    );
    assert_diag(
        &d,
        "user.yaml:7:3: User/alice: spec.tokenSecretFile",
        "not both",
    );
}

#[test]
fn warm_greater_than_what_the_host_port_range_can_serve_is_reported_at_spec_warm() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  warm: 11",
            "  template:",
            "    image: nginx",
            "    ports: [{name: http, containerPort: 80}]",
            "  hostPorts: {start: 8000, end: 8009}",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:6:3: Pool/web: spec.warm",
        "warm (11) is greater than max (10)",
    );
}

#[test]
fn a_bad_claim_ttl_on_a_pool_is_reported_at_spec_claim_ttl() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "  claimTTL: 5 minutes",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:8:3: Pool/web: spec.claimTTL",
        "invalid duration \"5 minutes\"",
    );
}

#[test]
fn a_duration_without_a_unit_on_a_claim_is_reported_at_spec_ttl() {
    let d = only_diagnostic(
        "claim.yaml",
        &[
            API,
            "kind: Claim",
            "metadata:",
            "  name: c1",
            "spec:",
            "  pool: web",
            "  user: alice",
            "  ttl: 10",
        ],
    );
    assert_diag(&d, "claim.yaml:8:3: Claim/c1: spec.ttl", "missing unit");
}

#[test]
fn a_duration_with_an_unknown_unit_is_reported_at_spec_ttl() {
    let d = only_diagnostic(
        "claim.yaml",
        &[
            API,
            "kind: Claim",
            "metadata:",
            "  name: c1",
            "spec:",
            "  pool: web",
            "  user: alice",
            "  ttl: 3w",
        ],
    );
    assert_diag(
        &d,
        "claim.yaml:8:3: Claim/c1: spec.ttl",
        "unknown unit \"w\"",
    );
}

#[test]
fn bad_cpu_and_memory_quantities_are_reported_at_their_keys() {
    let parsed = parse(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    resources:",
            "      cpu: lots",
            "      memory: 256MB",
        ],
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 2, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "pool.yaml:9:7: Pool/web: spec.template.resources.cpu",
        "invalid CPU quantity \"lots\"",
    );
    assert_diag(
        &parsed.diagnostics[1],
        "pool.yaml:10:7: Pool/web: spec.template.resources.memory",
        "invalid memory quantity \"256MB\"",
    );
}

#[test]
fn claim_resources_need_the_template_to_declare_them_and_a_claims_must_parse() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    resources: {cpu: 500m}",
            "  claimResources:",
            "    cpu: '2'",
            "    memory: 1Gi",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:11:5: Pool/web: spec.claimResources.memory",
        "claims may change memory only where spec.template.resources.memory declares it",
    );
    let d = only_diagnostic(
        "claim.yaml",
        &[
            API,
            "kind: Claim",
            "metadata:",
            "  name: c1",
            "spec:",
            "  pool: web",
            "  user: alice",
            "  resources: {memory: 1GB}",
        ],
    );
    assert_diag(
        &d,
        "claim.yaml:8:15: Claim/c1: spec.resources.memory",
        "invalid memory quantity \"1GB\"",
    );
}

#[test]
fn a_zero_cpu_in_a_flow_mapping_is_reported_at_its_key() {
    let d = only_diagnostic(
        "pool.yaml",
        &[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "    resources: {cpu: \"0\"}",
        ],
    );
    assert_diag(
        &d,
        "pool.yaml:8:17: Pool/web: spec.template.resources.cpu",
        "must be greater than zero",
    );
}

#[test]
fn a_deployment_container_quantity_is_reported_with_the_container_index() {
    let d = only_diagnostic(
        "dep.yaml",
        &[
            API,
            "kind: Deployment",
            "metadata:",
            "  name: app",
            "spec:",
            "  containers:",
            "  - name: web",
            "    image: nginx",
            "  - name: db",
            "    image: postgres",
            "    resources:",
            "      memory: lots",
        ],
    );
    assert_diag(
        &d,
        "dep.yaml:12:7: Deployment/app: spec.containers[1].resources.memory",
        "invalid memory quantity \"lots\"",
    );
}

#[test]
fn an_invalid_name_is_reported_at_metadata_name() {
    let d = only_diagnostic(
        "user.yaml",
        &[
            API,
            "kind: User",
            "metadata:",
            "  name: Bad_Name",
            "spec: {}",
        ],
    );
    assert_diag(
        &d,
        "user.yaml:4:3: User/Bad_Name: metadata.name",
        "name \"Bad_Name\" must consist of lowercase letters",
    );
}

#[test]
fn an_unknown_kind_is_reported_at_kind() {
    let d = only_diagnostic(
        "x.yaml",
        &[API, "kind: Gadget", "metadata:", "  name: x", "spec: {}"],
    );
    assert_diag(&d, "x.yaml:2:1: Gadget/x: kind", "unknown kind \"Gadget\"");
}

#[test]
fn a_wrong_api_version_is_reported_at_api_version() {
    let d = only_diagnostic(
        "x.yaml",
        &[
            "kind: Pool",
            "apiVersion: apps/v1",
            "metadata:",
            "  name: web",
            "spec: {}",
        ],
    );
    assert_diag(
        &d,
        "x.yaml:2:1: Pool/web: apiVersion",
        "unsupported apiVersion \"apps/v1\"",
    );
}

#[test]
fn a_missing_api_version_is_reported() {
    let d = only_diagnostic(
        "x.yaml",
        &["kind: User", "metadata:", "  name: alice", "spec: {}"],
    );
    assert_diag(
        &d,
        "x.yaml:1:1: User/alice: apiVersion",
        "missing field `apiVersion`",
    );
}

#[test]
fn a_missing_kind_is_reported() {
    let d = only_diagnostic("x.yaml", &[API, "metadata:", "  name: x", "spec: {}"]);
    assert_diag(&d, "x.yaml:1:1: kind", "missing field `kind`");
}

#[test]
fn a_namespace_other_than_default_is_reported_at_metadata_namespace() {
    let d = only_diagnostic(
        "x.yaml",
        &[
            API,
            "kind: User",
            "metadata:",
            "  name: alice",
            "  namespace: prod",
            "spec: {}",
        ],
    );
    assert_diag(
        &d,
        "x.yaml:5:3: User/alice: metadata.namespace",
        "namespace \"prod\"",
    );
}

#[test]
fn a_status_pasted_from_get_output_and_labels_are_accepted() {
    let parsed = parse(
        "x.yaml",
        &[
            API,
            "kind: User",
            "metadata:",
            "  name: alice",
            "  namespace: default",
            "  labels: {team: a}",
            "spec:",
            "  email: a@example.com",
            "status:",
            "  activeClaims: 2",
        ],
    );
    assert!(parsed.is_clean(), "{:#?}", parsed.diagnostics);
    assert_eq!(parsed.objects.len(), 1);
    assert_eq!(parsed.objects[0].name, "alice");
    assert_eq!(parsed.objects[0].spec.kind(), Kind::User);
}

// ---------------------------------------------------------------------------------------------
// Many documents per file

fn three_documents() -> Vec<&'static str> {
    vec![
        // 1
        API,
        "kind: User",
        "metadata:",
        "  name: alice",
        "spec: {}",
        // 6
        "---",
        API,
        "kind: User",
        "metadata:",
        "  name: bob",
        "spec:",
        "  emali: bob@example.com",
        // 13
        "---",
        "# the pool",
        "",
        API,
        "kind: Pool",
        "metadata:",
        "  name: web",
        "spec:",
        "  warm: 3",
        "  max: 1",
        "  template:",
        "    image: nginx",
        // 25
        "...",
        "---",
        API,
        "kind: Claim",
        "metadata:",
        "  name: c1",
        "spec:",
        "  pool: web",
        "  user: alice",
        "  ttl: [1h]",
        // 35
        "---",
        API,
        "kind: Pool",
        "metadata:",
        "  name: ok",
        "spec:",
        "  template:",
        "    image: nginx",
    ]
}

#[test]
fn errors_in_later_documents_have_absolute_line_numbers() {
    let parsed = parse("many.yaml", &three_documents());
    let shown: Vec<String> = parsed.diagnostics.iter().map(|d| d.to_string()).collect();
    assert_eq!(shown.len(), 3, "{shown:#?}");
    assert_diag(
        &parsed.diagnostics[0],
        "many.yaml:12:3: User/bob: spec.emali",
        "unknown field `emali`",
    );
    assert_diag(
        &parsed.diagnostics[1],
        "many.yaml:21:3: Pool/web: spec.warm",
        "warm (3) is greater than max (1)",
    );
    assert_diag(
        &parsed.diagnostics[2],
        "many.yaml:34:8: Claim/c1: spec.ttl",
        "",
    );
}

#[test]
fn one_bad_document_does_not_hide_the_valid_ones_in_the_same_file() {
    let parsed = parse("many.yaml", &three_documents());
    let names: Vec<(Kind, &str)> = parsed
        .objects
        .iter()
        .map(|o| (o.spec.kind(), o.name.as_str()))
        .collect();
    assert_eq!(names, vec![(Kind::User, "alice"), (Kind::Pool, "ok")]);
}

#[test]
fn objects_remember_where_their_document_starts() {
    let parsed = parse("many.yaml", &three_documents());
    let origins: Vec<String> = parsed
        .objects
        .iter()
        .map(|o| o.origin.to_string())
        .collect();
    assert_eq!(origins, vec!["many.yaml:1:1", "many.yaml:36:1"]);
}

#[test]
fn a_file_starting_with_a_document_marker_and_comments_keeps_its_line_numbers() {
    let d = only_diagnostic(
        "x.yaml",
        &[
            "# leading comment",
            "---",
            "# another",
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  template:",
            "    image: nginx",
            "  warm: nope",
        ],
    );
    assert_diag(&d, "x.yaml:11:9: Pool/web: spec.warm", "u32");
}

#[test]
fn empty_files_and_empty_documents_yield_nothing() {
    for t in [
        "",
        "\n",
        "---\n",
        "---\n---\n",
        "# only a comment\n",
        "~\n",
        "null\n",
    ] {
        let parsed = parse_text(Path::new("empty.yaml"), t);
        assert!(parsed.objects.is_empty(), "{t:?}");
        assert!(parsed.is_clean(), "{t:?}: {:#?}", parsed.diagnostics);
    }
}

#[test]
fn a_document_that_is_not_a_mapping_is_reported_at_its_start() {
    let parsed = parse("x.yaml", &["- a", "- b", "---", "hello"]);
    let shown: Vec<String> = parsed.diagnostics.iter().map(|d| d.to_string()).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(shown[0].starts_with("x.yaml:1:1: "), "{shown:#?}");
    assert!(shown[1].starts_with("x.yaml:4:1: "), "{shown:#?}");
}

// ---------------------------------------------------------------------------------------------
// Invalid syntax

#[test]
fn invalid_yaml_syntax_is_reported_with_a_position() {
    let d = only_diagnostic(
        "x.yaml",
        &[API, "kind: Pool", "metadata:", "  name: [web", "spec: {}"],
    );
    assert_eq!((d.line, d.col), (5, 5), "{d}");
    assert_eq!(d.object, None);
    assert!(
        d.to_string().starts_with("x.yaml:5:5: invalid YAML: "),
        "{d}"
    );
}

#[test]
fn a_bad_indentation_is_reported_where_it_happens() {
    let d = only_diagnostic("x.yaml", &["a: b", " c: d"]);
    assert!(
        d.to_string().starts_with("x.yaml:2:3: invalid YAML: "),
        "{d}"
    );
}

#[test]
fn a_truncated_json_file_is_reported_as_invalid_without_a_panic() {
    let parsed = parse_text(
        Path::new("x.json"),
        "{\"name\": \"web\", \"image\": \"nginx\",",
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    let shown = parsed.diagnostics[0].to_string();
    assert!(shown.starts_with("x.json:1:1: invalid YAML: "), "{shown}");
}

#[test]
fn a_json_error_at_a_line_break_is_still_at_column_one() {
    // serde_json reports column 0 for an error at a newline; positions are 1-based.
    let parsed = parse_text(Path::new("x.json"), "\"a\nb\"");
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "x.json:2:1: Deployment/x",
        "invalid JSON: control character",
    );
}

#[test]
fn a_syntax_error_in_a_later_document_hides_the_whole_file_but_is_located() {
    // The event stream stops at the first syntax error: that is the file's one diagnostic.
    let parsed = parse(
        "x.yaml",
        &[
            API,
            "kind: User",
            "metadata: {name: alice}",
            "spec: {}",
            "---",
            "a: [b",
        ],
    );
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    let d = &parsed.diagnostics[0];
    assert!(d.line >= 6, "{d}");
    assert!(d.message.starts_with("invalid YAML: "), "{d}");
}

// ---------------------------------------------------------------------------------------------
// Pod Manager JSON

#[test]
fn a_pod_manager_object_becomes_a_deployment_named_after_the_file_stem() {
    let parsed = parse_text(
        Path::new("configs/webserver.json"),
        r#"{"name": "nginx", "image": "nginx:1.25", "ports": {"80/tcp": 8080}}"#,
    );
    assert!(parsed.is_clean(), "{:#?}", parsed.diagnostics);
    assert_eq!(parsed.objects.len(), 1);
    let o = &parsed.objects[0];
    assert_eq!(o.name, "webserver");
    assert_eq!(o.spec.kind(), Kind::Deployment);
    let Spec::Deployment(d) = &o.spec else {
        unreachable!()
    };
    assert_eq!(d.network, None);
    assert_eq!(d.containers.len(), 1);
    let c = &d.containers[0];
    assert_eq!(c.name, "nginx");
    assert_eq!(c.image, "nginx:1.25");
    assert_eq!(c.ports, BTreeMap::from([("80/tcp".to_owned(), 8080)]));
    assert_eq!(c.replicas, 1);
    assert!(c.command.is_empty());
    assert!(c.environment.is_empty());
    assert!(c.volumes.is_empty());
}

#[test]
fn a_pod_manager_file_stem_is_turned_into_a_valid_name() {
    let parsed = parse_text(
        Path::new("My_Web.App.json"),
        r#"{"name": "web", "image": "nginx"}"#,
    );
    assert!(parsed.is_clean(), "{:#?}", parsed.diagnostics);
    assert_eq!(parsed.objects[0].name, "my-web-app");
}

#[test]
fn a_pod_manager_list_becomes_one_deployment_with_the_containers_in_order() {
    let d = pod_manager(
        "pair.json",
        r#"[
  {"name": "nginx", "image": "nginx", "ports": {"80/tcp": 8080}},
  {"name": "redis", "image": "redis:7", "ports": {"6379/tcp": 6379}}
]"#,
    );
    let names: Vec<&str> = d.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["nginx", "redis"]);
    assert_eq!(d.containers[1].image, "redis:7");
    assert_eq!(
        d.containers[1].ports,
        BTreeMap::from([("6379/tcp".to_owned(), 6379)])
    );
}

#[test]
fn a_pod_manager_command_string_is_shell_split() {
    let d = pod_manager(
        "cmd.json",
        r#"{"name": "app", "image": "busybox", "command": "sh -c 'echo \"hi there\" && sleep 1'"}"#,
    );
    assert_eq!(
        d.containers[0].command,
        ["sh", "-c", "echo \"hi there\" && sleep 1"]
    );
}

#[test]
fn a_pod_manager_command_list_is_kept_as_is() {
    let d = pod_manager(
        "cmd.json",
        r#"{"name": "app", "image": "busybox", "command": ["echo", "a b"]}"#,
    );
    assert_eq!(d.containers[0].command, ["echo", "a b"]);
}

#[test]
fn a_pod_manager_command_with_unbalanced_quotes_is_reported_at_command() {
    let parsed = parse_text(
        Path::new("cmd.json"),
        r#"{"name": "app", "image": "busybox", "command": "sh -c 'oops"}"#,
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1);
    assert_diag(
        &parsed.diagnostics[0],
        "cmd.json:1:37: Deployment/cmd: command",
        "unbalanced quotes",
    );
}

#[test]
fn a_pod_manager_environment_map_is_read_with_non_strings_as_text() {
    let d = pod_manager(
        "env.json",
        r#"{"name": "app", "image": "busybox", "environment": {"A": "1", "B": 2, "C": true}}"#,
    );
    assert_eq!(
        d.containers[0].environment,
        BTreeMap::from([
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "2".to_owned()),
            ("C".to_owned(), "true".to_owned()),
        ])
    );
}

#[test]
fn a_pod_manager_environment_list_of_key_value_pairs_is_split_at_the_first_equals() {
    let d = pod_manager(
        "env.json",
        r#"{"name": "app", "image": "busybox", "environment": ["A=1", "URL=x?a=b", "EMPTY="]}"#,
    );
    assert_eq!(
        d.containers[0].environment,
        BTreeMap::from([
            ("A".to_owned(), "1".to_owned()),
            ("EMPTY".to_owned(), String::new()),
            ("URL".to_owned(), "x?a=b".to_owned()),
        ])
    );
}

#[test]
fn a_pod_manager_environment_entry_without_equals_is_reported_with_its_item_index() {
    let parsed = parse_text(
        Path::new("env.json"),
        "[{\"name\": \"web\", \"image\": \"nginx\"},\n {\"name\": \"x\", \"image\": \"y\", \"environment\": [\"NOEQ\"]}]\n",
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "env.json:2:30: Deployment/env: [1].environment",
        "\"NOEQ\" is not KEY=VALUE",
    );
}

#[test]
fn pod_manager_volumes_as_a_map_keep_bind_and_mode() {
    let d = pod_manager(
        "vol.json",
        r#"{"name": "app", "image": "busybox", "volumes": {"/srv/www": {"bind": "/usr/share/nginx/html", "mode": "ro"}, "data": {"bind": "/data"}}}"#,
    );
    assert_eq!(
        d.containers[0].volumes,
        BTreeMap::from([
            (
                "/srv/www".to_owned(),
                VolumeMount {
                    bind: "/usr/share/nginx/html".to_owned(),
                    mode: VolumeMode::Ro
                }
            ),
            (
                "data".to_owned(),
                VolumeMount {
                    bind: "/data".to_owned(),
                    mode: VolumeMode::Rw
                }
            ),
        ])
    );
}

#[test]
fn pod_manager_volumes_as_a_list_of_source_target_mode_are_split() {
    let d = pod_manager(
        "vol.json",
        r#"{"name": "app", "image": "busybox", "volumes": ["data:/data:ro", "/host/logs:/logs"]}"#,
    );
    assert_eq!(
        d.containers[0].volumes,
        BTreeMap::from([
            (
                "/host/logs".to_owned(),
                VolumeMount {
                    bind: "/logs".to_owned(),
                    mode: VolumeMode::Rw
                }
            ),
            (
                "data".to_owned(),
                VolumeMount {
                    bind: "/data".to_owned(),
                    mode: VolumeMode::Ro
                }
            ),
        ])
    );
}

#[test]
fn a_pod_manager_volume_with_an_unknown_mode_is_reported_at_volumes() {
    let parsed = parse_text(
        Path::new("vol.json"),
        r#"{"name": "app", "image": "busybox", "volumes": ["data:/data:rx"]}"#,
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1);
    assert_diag(
        &parsed.diagnostics[0],
        "vol.json:1:37: Deployment/vol: volumes",
        "unknown mode \"rx\"",
    );
}

#[test]
fn a_pod_manager_port_key_without_protocol_and_a_host_ip_binding_are_normalised() {
    let d = pod_manager(
        "ports.json",
        r#"{"name": "app", "image": "nginx", "ports": {"81": "0.0.0.0:8081", "53/udp": 5353}}"#,
    );
    assert_eq!(
        d.containers[0].ports,
        BTreeMap::from([("53/udp".to_owned(), 5353), ("81/tcp".to_owned(), 8081)])
    );
}

#[test]
fn a_pod_manager_port_bound_to_one_host_address_is_refused_not_published_on_all() {
    for addr in ["127.0.0.1:5432", "10.0.0.5:5432", "[::1]:5432"] {
        let json =
            format!(r#"{{"name": "db", "image": "postgres", "ports": {{"5432/tcp": "{addr}"}}}}"#);
        let parsed = parse_text(Path::new("db.json"), &json);
        assert!(parsed.objects.is_empty(), "{addr}");
        assert_eq!(
            parsed.diagnostics.len(),
            1,
            "{addr}: {:#?}",
            parsed.diagnostics
        );
        assert_diag(
            &parsed.diagnostics[0],
            "db.json:1:37: Deployment/db: ports",
            "does not do",
        );
    }
    for all in ["0.0.0.0:5432", "[::]:5432", ":5432", "5432"] {
        let json =
            format!(r#"{{"name": "db", "image": "postgres", "ports": {{"5432/tcp": "{all}"}}}}"#);
        let d = pod_manager("db.json", &json);
        assert_eq!(
            d.containers[0].ports,
            BTreeMap::from([("5432/tcp".to_owned(), 5432)]),
            "{all}"
        );
    }
}

#[test]
fn a_pod_manager_unknown_field_is_an_error_naming_the_field_at_its_key() {
    let parsed = parse_text(
        Path::new("bad.json"),
        "{\"name\": \"web\",\n \"image\": \"nginx\",\n \"restart\": \"always\"}\n",
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "bad.json:3:2: Deployment/bad: restart",
        "unknown field `restart`",
    );
}

#[test]
fn a_pod_manager_unknown_field_in_the_second_item_is_named_with_its_index() {
    let parsed = parse_text(
        Path::new("bad.json"),
        "[{\"name\": \"web\", \"image\": \"nginx\", \"restart\": 0},\n {\"name\": \"x\", \"image\": \"y\", \"restart\": 1}]\n",
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    // serde_json stops at the first item's unknown field.
    assert_diag(
        &parsed.diagnostics[0],
        "bad.json:1:36: Deployment/bad: [0].restart",
        "unknown field `restart`",
    );
    let parsed = parse_text(
        Path::new("bad.json"),
        "[{\"name\": \"web\", \"image\": \"nginx\"},\n {\"name\": \"x\", \"image\": \"y\", \"restart\": 1}]\n",
    );
    assert_diag(
        &parsed.diagnostics[0],
        "bad.json:2:30: Deployment/bad: [1].restart",
        "unknown field `restart`",
    );
}

#[test]
fn a_pod_manager_field_of_the_wrong_type_is_reported_at_the_value() {
    let parsed = parse_text(
        Path::new("web.json"),
        "{\"name\": \"web\",\n \"image\": 5}\n",
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "web.json:2:11: Deployment/web: image",
        "invalid type: integer `5`, expected a string",
    );
}

#[test]
fn a_pod_manager_list_where_a_map_is_expected_is_reported_at_the_value_with_its_index() {
    let parsed = parse_text(
        Path::new("web.json"),
        "[{\"name\": \"web\", \"image\": \"x\"},\n {\"name\": \"db\", \"image\": \"x\", \"ports\": [1, 2]}]\n",
    );
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "web.json:2:40: Deployment/web: [1].ports",
        "invalid type: sequence, expected a map",
    );
}

#[test]
fn a_pod_manager_field_of_the_wrong_shape_names_the_field_and_the_shapes_allowed() {
    let cases = [
        (
            r#"{"name": "web", "image": "x", "command": 5}"#,
            "web.json:1:31: Deployment/web: command",
            "expected a string or a list of strings",
        ),
        (
            r#"{"name": "web", "image": "x", "environment": "A=1"}"#,
            "web.json:1:31: Deployment/web: environment",
            "list of \"KEY=VALUE\" strings",
        ),
        (
            r#"{"name": "web", "image": "x", "volumes": {"a": {"bind": 7}}}"#,
            "web.json:1:31: Deployment/web: volumes",
            "\"SOURCE:TARGET[:MODE]\"",
        ),
        (
            r#"{"name": "web", "image": "x", "ports": {"80/tcp": -1}}"#,
            "web.json:1:31: Deployment/web: ports",
            "a host port must be a number",
        ),
    ];
    for (json, prefix, part) in cases {
        let parsed = parse_text(Path::new("web.json"), json);
        assert_eq!(
            parsed.diagnostics.len(),
            1,
            "{json}: {:#?}",
            parsed.diagnostics
        );
        let d = &parsed.diagnostics[0];
        assert_diag(d, prefix, part);
        assert!(!d.message.contains("untagged"), "{d}");
    }
}

#[test]
fn a_pod_manager_field_given_twice_is_reported_at_the_second_key() {
    let parsed = parse_text(
        Path::new("web.json"),
        r#"{"name": "web", "image": "x", "name": "again"}"#,
    );
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    assert_diag(
        &parsed.diagnostics[0],
        "web.json:1:31: Deployment/web: name",
        "duplicate field `name`",
    );
}

#[test]
fn a_pod_manager_config_missing_its_image_is_an_error() {
    let parsed = parse_text(Path::new("bad.json"), r#"{"name": "web"}"#);
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    let d = &parsed.diagnostics[0];
    assert_eq!(d.object.as_deref(), Some("Deployment/bad"));
    assert!(d.message.contains("missing field `image`"), "{d}");
    assert!(d.to_string().starts_with("bad.json:1:"), "{d}");
}

#[test]
fn the_one_shot_hello_world_config_restarts_only_on_failure() {
    let parsed = parse_text(
        Path::new("hello-world.json"),
        r#"{"name": "hello", "image": "hello-world"}"#,
    );
    assert!(parsed.is_clean(), "{:#?}", parsed.diagnostics);
    let o = &parsed.objects[0];
    assert_eq!(o.name, "hello-world");
    let Spec::Deployment(d) = &o.spec else {
        panic!("not a deployment: {o:?}")
    };
    assert_eq!(d.containers.len(), 1);
    assert_eq!(d.containers[0].image, "hello-world");
    assert_eq!(d.containers[0].restart_policy, RestartPolicy::OnFailure);
}

#[test]
fn every_pod_manager_container_restarts_only_on_failure() {
    let d = pod_manager(
        "pair.json",
        r#"[{"name": "nginx", "image": "nginx"}, {"name": "redis", "image": "redis"}]"#,
    );
    assert!(
        d.containers
            .iter()
            .all(|c| c.restart_policy == RestartPolicy::OnFailure)
    );
}

#[test]
fn a_json_file_with_kind_is_read_as_a_spec_not_as_pod_manager() {
    let parsed = parse_text(
        Path::new("alice.json"),
        r#"{"apiVersion": "poolkeeper.dev/v1alpha1", "kind": "User", "metadata": {"name": "alice"}, "spec": {}}"#,
    );
    assert!(parsed.is_clean(), "{:#?}", parsed.diagnostics);
    assert_eq!(parsed.objects[0].name, "alice");
    assert_eq!(parsed.objects[0].spec.kind(), Kind::User);
}

#[test]
fn the_pod_manager_format_is_only_recognised_in_json_files() {
    let d = only_diagnostic("web.yaml", &["name: web", "image: nginx"]);
    assert_diag(&d, "web.yaml:1:1: kind", "missing field `kind`");
}

#[test]
fn a_pod_manager_deployment_failing_validation_is_reported() {
    let parsed = parse_text(
        Path::new("dup.json"),
        r#"[{"name": "web", "image": "nginx"}, {"name": "web", "image": "nginx"}]"#,
    );
    assert!(parsed.objects.is_empty());
    assert_eq!(parsed.diagnostics.len(), 1, "{:#?}", parsed.diagnostics);
    let d = &parsed.diagnostics[0];
    assert_eq!(d.object.as_deref(), Some("Deployment/dup"));
    assert_eq!(d.path, "spec.containers[1].name");
    assert!(
        d.message.contains("duplicate container name \"web\""),
        "{d}"
    );
}

// ---------------------------------------------------------------------------------------------
// Cross-object checks through validate_paths

#[test]
fn duplicate_names_across_two_files_are_reported_with_both_locations() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.yaml", &pool_with_ports("web", 8000, 8009));
    let b = write(
        dir.path(),
        "sub/b.yaml",
        &format!(
            "# another copy\n---\n{}",
            text(&[
                API,
                "kind: Pool",
                "metadata:",
                "  name: web",
                "spec:",
                "  template: {image: x}"
            ])
        ),
    );
    let (objects, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert_eq!(objects.len(), 2);
    assert_eq!(
        problems,
        vec![format!(
            "{}:3:1: Pool/web: metadata.name: also declared at {}:1:1",
            b.display(),
            a.display()
        )]
    );
}

#[test]
fn the_same_name_in_two_kinds_is_not_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "all.yaml",
        &format!(
            "{}---\n{}",
            text(&[
                API,
                "kind: Pool",
                "metadata: {name: web}",
                "spec: {template: {image: x}}"
            ]),
            text(&[API, "kind: User", "metadata: {name: web}", "spec: {}"]),
        ),
    );
    let (objects, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert_eq!(objects.len(), 2);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_claim_naming_a_missing_pool_and_a_missing_user_is_reported_twice() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "claims.yaml",
        &format!(
            "{}---\n{}",
            text(&[API, "kind: User", "metadata: {name: alice}", "spec: {}"]),
            text(&[
                API,
                "kind: Claim",
                "metadata:",
                "  name: c1",
                "spec:",
                "  pool: nope",
                "  user: ghost",
            ]),
        ),
    );
    let (objects, problems) = validate_paths(std::slice::from_ref(&f));
    assert_eq!(objects.len(), 2);
    assert_eq!(
        problems,
        vec![
            format!(
                "{}:11:3: Claim/c1: spec.pool: pool \"nope\" is not declared",
                f.display()
            ),
            format!(
                "{}:12:3: Claim/c1: spec.user: user \"ghost\" is not declared",
                f.display()
            ),
        ]
    );
}

#[test]
fn a_claim_whose_pool_and_user_are_declared_in_other_files_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "pools/web.yaml",
        &pool_with_ports("web", 8000, 8009),
    );
    write(
        dir.path(),
        "users/alice.yaml",
        &text(&[API, "kind: User", "metadata: {name: alice}", "spec: {}"]),
    );
    write(
        dir.path(),
        "claims/c1.yml",
        &text(&[
            API,
            "kind: Claim",
            "metadata: {name: c1}",
            "spec: {pool: web, user: alice, ttl: 1h30m}",
        ]),
    );
    let (objects, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(objects.len(), 3);
}

#[test]
fn a_user_quota_naming_a_missing_pool_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "u.yaml",
        &text(&[
            API,
            "kind: User",
            "metadata: {name: alice}",
            "spec: {quota: {pools: [gpu]}}",
        ]),
    );
    let (_, problems) = validate_paths(std::slice::from_ref(&f));
    assert_eq!(
        problems,
        vec![format!(
            "{}:4:24: User/alice: spec.quota.pools[0]: pool \"gpu\" is not declared",
            f.display()
        )]
    );
}

#[test]
fn two_pools_with_overlapping_host_ports_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.yaml", &pool_with_ports("web", 8000, 8009));
    let b = write(dir.path(), "b.yaml", &pool_with_ports("api", 8005, 8020));
    let (objects, problems) = validate_paths(&[a.clone(), b.clone()]);
    assert_eq!(objects.len(), 2);
    assert_eq!(
        problems,
        vec![format!(
            "{}:9:3: Pool/api: spec.hostPorts: host ports 8005-8020 overlap ports 8000-8009 of Pool/web",
            b.display()
        )]
    );
}

#[test]
fn adjacent_host_port_ranges_do_not_overlap() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &pool_with_ports("web", 8000, 8009));
    write(dir.path(), "b.yaml", &pool_with_ports("api", 8010, 8019));
    let (objects, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert_eq!(objects.len(), 2);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_deployment_host_port_inside_a_pool_range_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a-pool.yaml",
        &pool_with_ports("web", 9000, 9009),
    );
    let dep = write(
        dir.path(),
        "b-dep.yaml",
        &text(&[
            "# a deployment",
            API,
            "kind: Deployment",
            "metadata:",
            "  name: site",
            "spec:",
            "  containers:",
            "  - name: nginx",
            "    image: nginx",
            "    ports: {\"80/tcp\": 9005}",
        ]),
    );
    let (_, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert_eq!(
        problems,
        vec![format!(
            "{}:10:13: Deployment/site: spec.containers[0].ports.80/tcp: host port 9005 overlap ports 9000-9009 of Pool/web",
            dep.display()
        )]
    );
}

#[test]
fn a_pod_manager_host_port_inside_a_pool_range_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a-pool.yaml",
        &pool_with_ports("web", 8000, 8099),
    );
    let pm = write(
        dir.path(),
        "legacy.json",
        r#"{"name": "nginx", "image": "nginx", "ports": {"80/tcp": 8080}}"#,
    );
    let (objects, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert_eq!(objects.len(), 2);
    assert_eq!(
        problems,
        vec![format!(
            "{}:1:1: Deployment/legacy: spec.containers[0].ports.80/tcp: host port 8080 overlap ports 8000-8099 of Pool/web",
            pm.display()
        )]
    );
}

#[test]
fn problems_of_every_file_of_a_folder_are_listed_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.yaml",
        &text(&[
            API,
            "kind: User",
            "metadata: {name: alice}",
            "spec: {emali: x}",
        ]),
    );
    let b = write(
        dir.path(),
        "b/c.yaml",
        &text(&[API, "kind: User", "metadata: {name: Bob}", "spec: {}"]),
    );
    let (objects, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert!(objects.is_empty());
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].starts_with(&format!("{}:4:8: User/alice: spec.emali: ", a.display())),
        "{problems:#?}"
    );
    assert!(
        problems[1].starts_with(&format!("{}:3:12: User/Bob: metadata.name: ", b.display())),
        "{problems:#?}"
    );
}

#[test]
fn a_missing_path_is_a_problem_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let (objects, problems) = validate_paths(std::slice::from_ref(&missing));
    assert!(objects.is_empty());
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].starts_with(&format!("{}: cannot read: ", missing.display())),
        "{problems:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Which files are read

#[test]
fn spec_files_are_yaml_yml_and_json() {
    for p in ["a.yaml", "dir/b.yml", "c.json", "/abs/d.yaml"] {
        assert!(is_spec_file(Path::new(p)), "{p}");
    }
    for p in [
        "a.txt",
        "Makefile",
        "a.yaml.bak",
        "a.YAML.orig",
        "README.md",
    ] {
        assert!(!is_spec_file(Path::new(p)), "{p}");
    }
}

#[test]
fn hidden_files_and_editor_temporary_files_are_not_spec_files() {
    for p in [
        ".hidden.yaml",
        "dir/.x.yaml.swp",
        ".x.swp",
        "x.yaml~",
        "x~",
        "#x.yaml#",
        "#x#",
        ".#x.yaml",
        "x.yaml.swp",
    ] {
        assert!(!is_spec_file(Path::new(p)), "{p}");
    }
}

#[test]
fn nothing_under_the_state_folder_is_a_spec_file() {
    assert!(!is_spec_file(Path::new("specs/.poolkeeper/status.json")));
    assert!(!is_spec_file(Path::new(".poolkeeper/x.yaml")));
    assert!(!is_spec_file(Path::new(
        "/srv/specs/.poolkeeper/deep/x.yaml"
    )));
}

#[test]
fn folders_are_walked_recursively_skipping_hidden_state_and_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keep = [
        write(root, "a.yaml", ""),
        write(root, "b/c.yml", ""),
        write(root, "b/d/e.json", ""),
        write(root, "z.yaml", ""),
    ];
    for skip in [
        ".poolkeeper/status.json",
        ".poolkeeper/x.yaml",
        ".git/config.yaml",
        ".hidden.yaml",
        "b/.c.yml.swp",
        "b/c.yml~",
        "b/#c.yml#",
        "notes.txt",
    ] {
        write(root, skip, "");
    }
    let found = spec_files(root).unwrap();
    let mut expected = keep.to_vec();
    expected.sort();
    assert_eq!(found, expected);
}

#[test]
fn a_file_given_directly_is_read_whatever_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "spec.txt", "");
    assert_eq!(spec_files(&f).unwrap(), vec![f.clone()]);
}

#[test]
fn a_missing_folder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(spec_files(&dir.path().join("missing")).is_err());
}

#[test]
fn invalid_files_in_the_state_folder_do_not_make_a_folder_invalid() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), ".poolkeeper/junk.yaml", "this: [is not valid");
    write(dir.path(), "x.yaml~", "this: [is not valid");
    write(
        dir.path(),
        "u.yaml",
        &text(&[API, "kind: User", "metadata: {name: alice}", "spec: {}"]),
    );
    let (objects, problems) = validate_paths(&[dir.path().to_path_buf()]);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(objects.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Never panics, always located

/// `FILE:LINE:COL: ` with a 1-based line and column.
fn assert_located(file: &str, d: &Diagnostic) {
    let shown = d.to_string();
    let rest = shown
        .strip_prefix(&format!("{file}:"))
        .unwrap_or_else(|| panic!("no file prefix: {shown:?}"));
    let mut parts = rest.splitn(3, ':');
    let line: u64 = parts
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{shown:?}"));
    let col: u64 = parts
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{shown:?}"));
    assert!(
        parts.next().unwrap().starts_with(' '),
        "no space after position: {shown:?}"
    );
    assert_eq!((line, col), (d.line, d.col));
    assert!(line >= 1 && col >= 1, "position not 1-based: {shown:?}");
}

/// Pieces of YAML and JSON that, glued together, make plausible and broken documents.
fn yamlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("apiVersion: poolkeeper.dev/v1alpha1\n".to_owned()),
        Just("kind: Pool\n".to_owned()),
        Just("kind: Claim\n".to_owned()),
        Just("kind: Deployment\n".to_owned()),
        Just("metadata:\n  name: web\n".to_owned()),
        Just("spec:\n".to_owned()),
        Just("  template:\n    image: nginx\n".to_owned()),
        Just("  warm: 3\n  max: 1\n".to_owned()),
        Just("  claimTTL: 5x\n".to_owned()),
        Just("  containers:\n  - name: a\n    image: b\n".to_owned()),
        Just("---\n".to_owned()),
        Just("...\n".to_owned()),
        Just("- ".to_owned()),
        Just(": ".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("!tag ".to_owned()),
        Just("%YAML 1.2\n".to_owned()),
        Just("# c\n".to_owned()),
        Just("\t".to_owned()),
        Just("\n".to_owned()),
        Just("  ".to_owned()),
        Just("{\"name\": \"x\", \"image\": \"y\"}".to_owned()),
        Just("\"ports\": {\"80/tcp\": 8080}".to_owned()),
        Just(", ".to_owned()),
        "[a-zA-Z0-9_./-]{1,8}",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic_and_every_diagnostic_is_located(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        json in any::<bool>(),
    ) {
        let file = if json { "fuzz.json" } else { "fuzz.yaml" };
        let text = String::from_utf8_lossy(&bytes);
        let parsed = parse_text(Path::new(file), &text);
        for d in &parsed.diagnostics {
            assert_located(file, d);
        }
    }

    #[test]
    fn yamlish_text_never_panics_and_every_diagnostic_is_located(
        text in yamlish(),
        json in any::<bool>(),
    ) {
        let file = if json { "fuzz.json" } else { "fuzz.yaml" };
        let parsed = parse_text(Path::new(file), &text);
        for d in &parsed.diagnostics {
            assert_located(file, d);
        }
    }

    #[test]
    fn a_valid_document_with_one_character_changed_never_panics(
        at in 0usize..200,
        replacement in prop_oneof![Just(' '), Just(':'), Just('-'), Just('\n'), Just('['), Just('"'), Just('x'), Just('\t')],
    ) {
        let valid = text(&[
            API,
            "kind: Pool",
            "metadata:",
            "  name: web",
            "spec:",
            "  warm: 1",
            "  template:",
            "    image: nginx",
            "    ports:",
            "      - name: http",
            "        containerPort: 80",
            "  hostPorts: {start: 8000, end: 8009}",
        ]);
        let mut chars: Vec<char> = valid.chars().collect();
        let i = at % chars.len();
        chars[i] = replacement;
        let mutated: String = chars.into_iter().collect();
        let parsed = parse_text(Path::new("m.yaml"), &mutated);
        for d in &parsed.diagnostics {
            assert_located("m.yaml", d);
        }
    }
}
