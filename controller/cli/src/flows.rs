//! Reading the example flows for the web console (`run --flows DIR`): each folder of DIR is a
//! flow, its README's first heading and paragraph say what it is, its YAML files declare its
//! objects (checked as `validate` checks them: a problem stops the start, naming the file and
//! line), and its `*.steps` files are checked scripts.

use std::path::Path;

use anyhow::{Context, bail};

use poolkeeper_http::console::Flow;

/// The flows of `dir`, by folder name.
pub fn load(dir: &Path) -> anyhow::Result<Vec<Flow>> {
    let mut folders: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the flows in {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    let mut flows = Vec::new();
    for folder in folders {
        let name = folder
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with('.') {
            continue;
        }
        if poolkeeper_kinds::units::check_name(&name).is_err() {
            bail!(
                "{}: a flow's folder name must be a lowercase name (letters, digits, '-')",
                folder.display()
            );
        }
        let readme = std::fs::read_to_string(folder.join("README.md")).unwrap_or_default();
        let (title, summary) = describe(&readme, &name);
        let mut files: Vec<_> = std::fs::read_dir(&folder)
            .with_context(|| format!("reading {}", folder.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        let mut objects = Vec::new();
        let mut steps = Vec::new();
        for f in files {
            if poolkeeper_source_dir::loader::is_spec_file(&f) {
                let parsed = poolkeeper_source_dir::loader::parse_file(&f);
                if let Some(d) = parsed.diagnostics.first() {
                    bail!("flow {name}: {d}");
                }
                objects.extend(parsed.objects);
            } else if f.extension().is_some_and(|e| e == "steps") {
                let s = crate::access::load_steps(&f)?;
                let file = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                steps.push((file, s));
            }
        }
        if objects.is_empty() {
            continue;
        }
        flows.push(Flow {
            name,
            title,
            summary,
            objects,
            steps,
        });
    }
    Ok(flows)
}

/// A README's first heading and first paragraph (Markdown marks left as they are).
fn describe(readme: &str, name: &str) -> (String, String) {
    let mut lines = readme.lines();
    let title = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("# "))
        .map_or_else(|| name.to_owned(), |t| t.trim().to_owned());
    let summary: Vec<&str> = lines
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .collect();
    (title, summary.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_flow_loads_with_its_title_and_objects() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flows");
        let flows = load(&dir).expect("the example flows load");
        assert_eq!(flows.len(), 8);
        assert_eq!(flows[0].name, "01-hello-world");
        assert!(!flows[0].title.is_empty() && !flows[0].summary.is_empty());
        let automation = flows
            .iter()
            .find(|f| f.name == "03-command-automation")
            .expect("03");
        assert_eq!(automation.steps.len(), 2);
        assert!(flows.iter().all(|f| !f.objects.is_empty()));
    }

    #[test]
    fn a_readme_gives_its_heading_and_first_paragraph() {
        let (t, s) = describe("# Hello\n\nA line\nand more.\n\nNext.\n", "x");
        assert_eq!((t.as_str(), s.as_str()), ("Hello", "A line and more."));
        assert_eq!(describe("", "x").0, "x");
    }
}
