//! The OpenAPI 3.1 document of the HTTP API, served at `GET /api/v1/openapi.json`. It is
//! assembled here, and only here, from the handlers' `#[utoipa::path]` annotations, the request
//! types' derives, the body shapes of [`super::schema`] and the bearer-token scheme.
//! `tests/openapi.rs` holds the document against `super::routes()`.

use super::commands;
use super::queries;
use super::reads;
use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use super::schema::{ErrorBody, Key, Name};
use utoipa::{Modify, OpenApi};

pub use super::schema::OPENAPI_PATH as PATH;

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
    paths(
        commands::create_database,
        queries::list_databases,
        queries::get_database,
        commands::delete_database,
        commands::create_class,
        queries::list_classes,
        queries::get_class,
        commands::update_class,
        commands::delete_class,
        commands::create_instance,
        queries::list_instances,
        commands::bulk_create_instances,
        queries::get_instance,
        commands::update_instance,
        commands::delete_instance,
        reads::get_command,
        reads::get_aggregate,
        reads::get_events,
        document,
        reads::healthz,
        reads::readyz,
        reads::metrics,
    ),
    // Referenced only from parameters, which utoipa does not collect by itself.
    components(schemas(ErrorBody, Name, Key, crate::domain::AggregateType)),
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
    Json(ApiDoc::openapi())
}

