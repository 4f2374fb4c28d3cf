//! Errors as the API answers them: `{"error": "...", "field": "..."}` with a status code.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use poolkeeper_engine::source::DeclareError;

/// A JSON error: `{"error": "...", "field": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    pub(crate) fn field(status: StatusCode, field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The message, with the field it is about when there is one (as the console shows it).
    pub(crate) fn words(&self) -> String {
        match &self.field {
            Some(f) => format!("{f}: {}", self.message),
            None => self.message.clone(),
        }
    }

    pub(crate) fn unavailable() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller is stopping",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message});
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        (self.status, Json(body)).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// A source's refusal, as the API answers it.
impl From<DeclareError> for ApiError {
    fn from(e: DeclareError) -> Self {
        let status = match &e {
            DeclareError::NotFound(_) => StatusCode::NOT_FOUND,
            DeclareError::Conflict(_) => StatusCode::CONFLICT,
            DeclareError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            DeclareError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            DeclareError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}
