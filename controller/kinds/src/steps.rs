//! A script of checked steps (`poolkeeper exec --steps FILE`, and the web console's example
//! flows): each step runs a command in a container and checks its exit code and output.

use serde::Deserialize;

/// A script of exec steps: each runs in the target and checks its exit code and output.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Steps {
    pub steps: Vec<StepSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    /// A command line for `sh -c`, or a list run as it is.
    pub run: RunSpec,
    #[serde(default)]
    pub expect: Expect,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RunSpec {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Expect {
    /// Default 0.
    #[serde(default)]
    pub exit_code: i64,
    /// Text the output must contain.
    #[serde(default)]
    pub output_contains: Option<String>,
}

impl RunSpec {
    pub fn argv(&self) -> Vec<String> {
        match self {
            RunSpec::Shell(s) => vec!["sh".into(), "-c".into(), s.clone()],
            RunSpec::Argv(v) => v.clone(),
        }
    }
}

impl StepSpec {
    /// What is wrong with a run that exited `code` having printed `output` (empty: it passed).
    pub fn problems(&self, code: i64, output: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if code != self.expect.exit_code {
            problems.push(format!(
                "expected exit code {}, got {code}",
                self.expect.exit_code
            ));
        }
        if let Some(want) = &self.expect.output_contains
            && !output.contains(want.as_str())
        {
            problems.push(format!("expected the output to contain {want:?}"));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_passes_only_with_its_exit_code_and_its_text() {
        let step = StepSpec {
            name: "n".into(),
            run: RunSpec::Shell("echo hi".into()),
            expect: Expect {
                exit_code: 0,
                output_contains: Some("hi".into()),
            },
        };
        assert_eq!(step.run.argv(), ["sh", "-c", "echo hi"]);
        assert!(step.problems(0, "hi there").is_empty());
        assert_eq!(step.problems(1, "hi").len(), 1);
        assert_eq!(step.problems(2, "empty").len(), 2);
    }
}
