//! The OpenAPI 3.1 document of the HTTP API, served at `GET /api/v1/openapi.json`. It is
//! assembled here, and only here, from the route table (`super::routes()`: each handler's
//! `#[utoipa::path]` annotation and the schemas it references), the body shapes of
//! [`super::schema`] and the bearer-token scheme.
//! `tests/openapi.rs` holds the document against `super::routes()`.

use super::Route;
use axum::Json;
use std::sync::OnceLock;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use super::schema::{ErrorBody, Key, Name, SeqConflictBody};
use utoipa::{Modify, OpenApi};


/// The name of the bearer-token scheme in the document; its scopes are `read`, `write` and
/// `admin` (see `auth`).
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "spiced",
        description = "Commands are appended to the event log (202 once durable); queries read the \
                       read models; reads of the write side answer from the log index."
    ),
    // Referenced only from parameters, which utoipa does not collect by itself.
    components(schemas(ErrorBody, SeqConflictBody, Name, Key, crate::domain::AggregateType)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(BEARER, SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object))
)]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    Json(DOCUMENT.get_or_init(|| assemble(&super::routes())).clone())
}

/// [`ApiDoc`] (info, the schemas parameters reference, the bearer scheme) with every route's
/// operation and the schemas its bodies reference.
pub fn assemble(routes: &[Route]) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    for route in routes {
        doc.paths.merge(route.operation.clone());
        components.schemas.extend(route.schemas.iter().cloned());
    }
    doc
}

