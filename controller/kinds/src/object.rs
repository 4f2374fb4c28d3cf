//! The source-independent view of declared objects that the core reconciles.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ClaimSpec, DeploymentSpec, PoolSpec, UserSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Pool,
    Claim,
    User,
    Deployment,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Pool, Kind::Claim, Kind::User, Kind::Deployment];

    /// Accepts the forms kubectl accepts: `pool`, `pools`, `Pool`, short names.
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "pool" | "pools" | "pl" => Some(Kind::Pool),
            "claim" | "claims" | "cl" => Some(Kind::Claim),
            "user" | "users" | "pku" => Some(Kind::User),
            "deployment" | "deployments" | "pkd" | "deploy" => Some(Kind::Deployment),
            _ => None,
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pool => "pools",
            Kind::Claim => "claims",
            Kind::User => "users",
            Kind::Deployment => "deployments",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjKey {
    pub kind: Kind,
    pub name: String,
}

impl ObjKey {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        ObjKey {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

// A Pool spec is larger than the others; specs are few and long-lived, so boxing would only add
// indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Spec {
    Pool(PoolSpec),
    Claim(ClaimSpec),
    User(UserSpec),
    Deployment(DeploymentSpec),
}

impl Spec {
    /// The spec as its kind's own JSON (what `spec:` holds in a file or an object).
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Spec::Pool(s) => serde_json::to_value(s),
            Spec::Claim(s) => serde_json::to_value(s),
            Spec::User(s) => serde_json::to_value(s),
            Spec::Deployment(s) => serde_json::to_value(s),
        };
        v.unwrap_or(serde_json::Value::Null)
    }

    pub fn kind(&self) -> Kind {
        match self {
            Spec::Pool(_) => Kind::Pool,
            Spec::Claim(_) => Kind::Claim,
            Spec::User(_) => Kind::User,
            Spec::Deployment(_) => Kind::Deployment,
        }
    }
}

/// Where an object was declared: a file, line and column; or, for a custom resource,
/// `NAMESPACE/Kind/NAME` with line 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: u64,
    pub col: u64,
}

/// `FILE:LINE:COL` for an object declared in a file; just the place (`NAMESPACE/Kind/NAME` for
/// a custom resource) when it has no line.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}", self.file.display());
        }
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// A declared object as the core sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub name: String,
    pub spec: Spec,
    pub origin: Origin,
    /// Bumped by the source each time the spec changes (as `metadata.generation`).
    pub generation: i64,
}

impl Object {
    pub fn key(&self) -> ObjKey {
        ObjKey::new(self.spec.kind(), self.name.clone())
    }
}

/// A problem with one field of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the document root, e.g. `spec.hostPorts.end`.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// One problem, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: u64,
    pub col: u64,
    /// `Kind/name` when known.
    pub object: Option<String>,
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}
