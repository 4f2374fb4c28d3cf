//! Multipart uploads (`curl -F file=@PATH`): raw bodies under a fuzzed Content-Type, and forms
//! built from fuzzed parts. What is accepted is only plain relative paths, each once.
#![no_main]

use std::collections::BTreeSet;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use poolkeeper_fuzz::Fields;

fuzz_target!(|data: &[u8]| {
    let mut f = Fields(data);
    let (content_type, body) = if f.byte() % 2 == 0 {
        (f.string(), f.rest().to_vec())
    } else {
        built(&mut f)
    };
    if !poolkeeper_http::upload::is_multipart(&content_type) {
        return;
    }
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    });
    let parsed = rt.block_on(poolkeeper_http::upload::parse_multipart(
        &content_type,
        body.into(),
    ));
    if let Ok(files) = parsed {
        let mut seen = BTreeSet::new();
        for (path, _) in &files {
            assert!(
                !path.is_empty()
                    && Path::new(path)
                        .components()
                        .all(|c| matches!(c, Component::Normal(_))),
                "accepted a path that is not plain and relative: {path:?}"
            );
            assert!(seen.insert(path.clone()), "accepted {path:?} twice");
        }
    }
});

/// A form of up to 6 parts, each with a fuzzed name, file name and content.
fn built(f: &mut Fields<'_>) -> (String, Vec<u8>) {
    let boundary = "fuzzboundary";
    let mut body = Vec::new();
    for _ in 0..(f.byte() % 6) {
        let name = f.string();
        let file = f.string();
        let content = f.bytes();
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = if f.byte() % 4 == 0 {
            format!("Content-Disposition: form-data; name={name:?}\r\n\r\n")
        } else {
            format!("Content-Disposition: form-data; name={name:?}; filename={file:?}\r\n\r\n")
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
