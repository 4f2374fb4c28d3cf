//! The watched directory's loader (YAML and JSON spec files, Pod Manager configs included):
//! any text yields objects and diagnostics, never a panic, and every diagnostic names the file
//! and a line and column inside it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new(match which % 3 {
        0 => "/specs/fuzz.yaml",
        1 => "/specs/fuzz.json",
        _ => "/specs/pod-manager/fuzz.json",
    });
    let text = String::from_utf8_lossy(rest);
    let parsed = poolkeeper_source_dir::loader::parse_text(path, &text);
    // Lines as YAML counts them: a lone carriage return ends a line too (as it does in most
    // editors), so a file of carriage returns has more lines than newlines.
    let lines = text
        .replace("\r\n", "\n")
        .split(['\r', '\n'])
        .count()
        .max(1) as u64;
    for d in &parsed.diagnostics {
        assert_eq!(d.file, path, "{d:?}");
        assert!(
            d.line <= lines + 1,
            "line past the end ({lines} lines): {d:?}"
        );
        assert!(!d.message.is_empty(), "{d:?}");
    }
    // What loaded is what the engine would be given: validating the set again never panics.
    let _ = poolkeeper_kinds::validate::validate_set(&parsed.objects);
});
