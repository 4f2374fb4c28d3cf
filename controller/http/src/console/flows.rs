//! The example flows (`--flows DIR`, e.g. `examples/flows`) as one-click runs on the
//! operator's page: each flow's objects with their parameters in a form (each container's
//! image, command and environment), declared through the source as one group when run
//! (`Declare::declare_group`), removed when stopped, and its checked steps run in its first
//! container with their output shown.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use poolkeeper_engine::status::Snapshot;
use poolkeeper_kinds::steps::Steps;
use poolkeeper_kinds::{DeploymentStatus, Kind, ObjKey, Object, Spec};

use crate::ApiState;
use crate::error::ApiError;

/// One example flow: a folder's objects, its README's title and first paragraph, and its
/// steps files.
#[derive(Clone, Debug)]
pub struct Flow {
    /// The folder's name (`01-hello-world`): also the group its objects are declared in.
    pub name: String,
    pub title: String,
    pub summary: String,
    pub objects: Vec<Object>,
    /// (file name, steps) of each `*.steps` file.
    pub steps: Vec<(String, Steps)>,
}

/// A parameter of a flow's form: `OBJECT/CONTAINER/image`, `.../command` or `.../env/KEY`.
pub(crate) struct Param {
    pub key: String,
    pub label: String,
    pub value: String,
}

/// The parameters of a flow, with their declared values.
pub(crate) fn params(flow: &Flow) -> Vec<Param> {
    let mut out = Vec::new();
    for o in &flow.objects {
        let Spec::Deployment(d) = &o.spec else {
            continue;
        };
        for c in &d.containers {
            let at = format!("{}/{}", o.name, c.name);
            out.push(Param {
                key: format!("{at}/image"),
                label: format!("{at}: image"),
                value: c.image.clone(),
            });
            out.push(Param {
                key: format!("{at}/command"),
                label: format!("{at}: command"),
                value: shlex::try_join(c.command.iter().map(String::as_str)).unwrap_or_default(),
            });
            for (k, v) in &c.environment {
                out.push(Param {
                    key: format!("{at}/env/{k}"),
                    label: format!("{at}: {k}"),
                    value: v.clone(),
                });
            }
        }
    }
    out
}

/// The flow's objects with the form's values applied, each checked as `validate` checks a
/// file: an unknown parameter or an invalid value is refused naming it.
pub(crate) fn with_params(
    flow: &Flow,
    form: &BTreeMap<String, String>,
) -> Result<Vec<Object>, ApiError> {
    let bad = |field: &str, m: String| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, field, m);
    let mut objects = flow.objects.clone();
    for (key, value) in form {
        if key == "csrf" {
            continue;
        }
        let parts: Vec<&str> = key.splitn(4, '/').collect();
        let (obj, container, what) = match parts.as_slice() {
            [o, c, w] | [o, c, w, _] => (*o, *c, *w),
            _ => return Err(bad(key, "not a parameter of this flow".into())),
        };
        let c = objects
            .iter_mut()
            .find(|o| o.name == obj)
            .and_then(|o| match &mut o.spec {
                Spec::Deployment(d) => d.containers.iter_mut().find(|c| c.name == container),
                _ => None,
            })
            .ok_or_else(|| bad(key, "not a parameter of this flow".into()))?;
        match (what, parts.get(3)) {
            ("image", None) => c.image = value.trim().to_owned(),
            ("command", None) => {
                c.command = shlex::split(value)
                    .ok_or_else(|| bad(key, "unbalanced quotes in the command".into()))?;
            }
            ("env", Some(k)) if c.environment.contains_key(*k) => {
                c.environment.insert((*k).to_owned(), value.clone());
            }
            _ => return Err(bad(key, "not a parameter of this flow".into())),
        }
    }
    for o in &objects {
        if let Some(e) = poolkeeper_kinds::validate::validate_object(&o.name, &o.spec)
            .into_iter()
            .next()
        {
            return Err(bad(
                &format!("{} {}: {}", o.spec.kind(), o.name, e.path),
                e.message,
            ));
        }
    }
    Ok(objects)
}

/// How a flow's objects stand now, in words (`Deployment hello: Exited (1/1 containers)`), and
/// whether any of them is declared.
pub(crate) fn standing(flow: &Flow, snap: &Snapshot) -> (bool, Vec<String>) {
    let mut running = false;
    let lines = flow
        .objects
        .iter()
        .map(|o| {
            let kind = o.spec.kind();
            match snap
                .objects
                .iter()
                .find(|v| v.kind == kind && v.name == o.name)
            {
                None => format!("{kind} {}: not declared", o.name),
                Some(v) => {
                    running = true;
                    if kind == Kind::Deployment {
                        let st: DeploymentStatus =
                            serde_json::from_value(v.status.clone()).unwrap_or_default();
                        let states: Vec<String> = st
                            .container_statuses
                            .iter()
                            .map(|c| format!("{} {}", c.name, c.state))
                            .collect();
                        format!(
                            "{kind} {}: {} of {} ready; {}",
                            o.name,
                            st.ready,
                            st.containers,
                            states.join(", ")
                        )
                    } else {
                        format!("{kind} {}: declared", o.name)
                    }
                }
            }
        })
        .collect();
    (running, lines)
}

/// The containers (instances) of a flow's deployments, as the snapshot knows them.
pub(crate) fn containers(flow: &Flow, snap: &Snapshot) -> Vec<String> {
    flow.objects
        .iter()
        .filter(|o| o.spec.kind() == Kind::Deployment)
        .filter_map(|o| {
            snap.objects
                .iter()
                .find(|v| v.kind == Kind::Deployment && v.name == o.name)
        })
        .flat_map(|v| {
            serde_json::from_value::<DeploymentStatus>(v.status.clone())
                .unwrap_or_default()
                .container_statuses
                .into_iter()
                .filter_map(|c| c.instance)
        })
        .collect()
}

fn find<'a>(state: &'a ApiState, name: &str) -> Result<&'a Flow, ApiError> {
    state
        .console
        .config
        .flows
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no flow {name:?}")))
}

/// `run` (with the form's parameters), `stop`, or `steps-N` (the flow's N-th steps file) of
/// flow `name`.
pub(crate) async fn flow_action(
    State(state): State<Arc<ApiState>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let csrf = form.get("csrf").cloned().unwrap_or_default();
    let act = async {
        let flow = find(&state, &name)?;
        match action.as_str() {
            "run" => {
                let objects = with_params(flow, &form)?;
                let names: Vec<String> = objects
                    .iter()
                    .map(|o| format!("{} {}", o.spec.kind(), o.name))
                    .collect();
                let at = state.declare.declare_group(&flow.name, objects).await?;
                Ok(format!(
                    "Flow {} runs: {} (declared in {at}).",
                    flow.name,
                    names.join(", ")
                ))
            }
            "stop" => {
                let keys = flow
                    .objects
                    .iter()
                    .map(|o| ObjKey::new(o.spec.kind(), o.name.clone()))
                    .collect();
                let was = state.declare.remove_group(&flow.name, keys).await?;
                Ok(if was {
                    format!("Flow {} stopped: its objects are removed.", flow.name)
                } else {
                    format!("Flow {} was not running.", flow.name)
                })
            }
            other => {
                let i: usize = other
                    .strip_prefix("steps-")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| super::pages::no_action(other))?;
                let (file, steps) = flow
                    .steps
                    .get(i)
                    .ok_or_else(|| super::pages::no_action(other))?;
                let (ok, text) = run_steps(&state, flow, steps).await?;
                state
                    .console
                    .set_flow_output(&flow.name, format!("{file}\n{text}"));
                let msg = format!(
                    "Flow {}: {file}: {text_first}",
                    flow.name,
                    text_first = text.lines().last().unwrap_or("")
                );
                if ok {
                    Ok(msg)
                } else {
                    Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, msg))
                }
            }
        }
    };
    super::pages::operator(&state, &headers, &csrf, act).await
}

/// Runs the steps in order in the flow's first container, stopping at the first failure:
/// whether all passed, and the report (a line per step, the failing one with its output).
async fn run_steps(
    state: &ApiState,
    flow: &Flow,
    steps: &Steps,
) -> Result<(bool, String), ApiError> {
    let snap = state
        .handle
        .snapshot()
        .await
        .map_err(|_| ApiError::unavailable())?;
    let Some(target) = containers(flow, &snap).into_iter().next() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("flow {} has no container running: run it first", flow.name),
        ));
    };
    let total = steps.steps.len();
    let mut report = String::new();
    for (i, step) in steps.steps.iter().enumerate() {
        let n = i + 1;
        let out = super::instance_answer(
            state.handle.exec(&target, step.run.argv()).await,
            |e| format!("exec in {target}: {e}"),
            (StatusCode::CONFLICT, format!("{target} is gone")),
        )?;
        let problems = step.problems(out.exit_code, &out.output);
        if problems.is_empty() {
            report.push_str(&format!("ok   {n}/{total} {}\n", step.name));
            continue;
        }
        report.push_str(&format!(
            "FAIL {n}/{total} {}: {}\n",
            step.name,
            problems.join("; ")
        ));
        for line in out.output.lines() {
            report.push_str(&format!("     {line}\n"));
        }
        report.push_str(&format!("{} of {total} steps passed", n - 1));
        return Ok((false, report));
    }
    report.push_str(&format!("{total} of {total} steps passed in {target}"));
    Ok((true, report))
}
