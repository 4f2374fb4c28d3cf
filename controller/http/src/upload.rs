//! Files uploaded into a claim's instance: a tar archive, or a `multipart/form-data` form
//! (`curl -F file=@index.html`), each part with a file name being one file. Either way every
//! path must be plain and relative (no `..`, nothing absolute), checked before anything is
//! written.

use poolkeeper_core::files::{PathSet, clean_relative};

/// Whether a request's `Content-Type` says multipart.
pub fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..10)
        .is_some_and(|t| t.eq_ignore_ascii_case("multipart/"))
}

/// The files of a `multipart/form-data` body: each part's `filename` is its path under the
/// mount path. A part without a file name, a path that leaves the mount path, or the same path
/// twice (or a file where another is a folder) is an error naming the part.
pub async fn parse_multipart(
    content_type: &str,
    body: axum::body::Bytes,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| format!("Content-Type {content_type:?}: {e}"))?;
    let stream = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut index = 0usize;
    let mut paths = PathSet::default();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| format!("not a multipart form: {e}"))?
    {
        index += 1;
        let part = match field.name() {
            Some(n) => format!("part {index} ({n:?})"),
            None => format!("part {index}"),
        };
        let Some(name) = field.file_name().map(str::to_owned) else {
            return Err(format!(
                "{part}: not a file (it has no filename; send files as `-F file=@PATH`)"
            ));
        };
        let Some(path) = clean_relative(&name) else {
            return Err(format!(
                "{part}: {name:?}: paths must be relative and stay inside the mount path"
            ));
        };
        paths.add(&path).map_err(|e| format!("{part}: {e}"))?;
        let path = path.to_string_lossy().into_owned();
        let bytes = field.bytes().await.map_err(|e| format!("{part}: {e}"))?;
        out.push((path, bytes.to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "multipart/form-data; boundary=XyZ";

    fn form(parts: &[(&str, Option<&str>, &str)]) -> axum::body::Bytes {
        let mut s = String::new();
        for (name, file, body) in parts {
            s.push_str("--XyZ\r\nContent-Disposition: form-data; name=\"");
            s.push_str(name);
            s.push('"');
            if let Some(f) = file {
                s.push_str("; filename=\"");
                s.push_str(f);
                s.push('"');
            }
            s.push_str("\r\nContent-Type: application/octet-stream\r\n\r\n");
            s.push_str(body);
            s.push_str("\r\n");
        }
        s.push_str("--XyZ--\r\n");
        axum::body::Bytes::from(s)
    }

    fn parse(body: axum::body::Bytes) -> Result<Vec<(String, Vec<u8>)>, String> {
        futures::executor::block_on(parse_multipart(CT, body))
    }

    #[test]
    fn each_file_part_is_a_file_at_its_file_name() {
        let files = parse(form(&[
            ("file", Some("index.html"), "<h1>hi</h1>\n"),
            ("file", Some("./site/app.js"), "x\r\ny"),
        ]))
        .expect("parsed");
        assert_eq!(
            files,
            vec![
                ("index.html".to_owned(), b"<h1>hi</h1>\n".to_vec()),
                ("site/app.js".to_owned(), b"x\r\ny".to_vec()),
            ]
        );
    }

    #[test]
    fn parts_that_escape_are_not_files_or_repeat_are_refused_by_name() {
        for (parts, want) in [
            (vec![("f", Some("../etc/passwd"), "x")], "part 1 (\"f\")"),
            (vec![("f", Some("/etc/passwd"), "x")], "stay inside"),
            (
                vec![("a", Some("ok"), "x"), ("note", None, "hello")],
                "part 2 (\"note\"): not a file",
            ),
            (
                vec![("a", Some("x"), "1"), ("b", Some("./x"), "2")],
                "part 2 (\"b\"): \"x\" is given twice",
            ),
            (
                vec![("a", Some("x"), "1"), ("b", Some("x/y"), "2")],
                "part 2 (\"b\"): \"x/y\" is inside \"x\", which is a file",
            ),
        ] {
            let e = parse(form(&parts)).expect_err("refused");
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let e = futures::executor::block_on(parse_multipart("multipart/form-data", form(&[])))
            .expect_err("no boundary");
        assert!(e.contains("Content-Type"), "{e}");
        assert!(parse(axum::body::Bytes::from_static(b"garbage")).is_err());
        assert!(is_multipart("Multipart/Form-Data; boundary=a"));
        assert!(!is_multipart("application/x-tar"));
    }
}
