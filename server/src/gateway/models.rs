//! `GET /v1/models` and `GET /v1/models/{model}`: the catalog, OpenAI-shaped
//! (DESIGN.md §4).

use std::sync::Arc;

use app::domain::Model;
use axum::{
    extract::State,
    http::HeaderMap,
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;

use super::error::GatewayError;
use super::Gateway;

/// One model as OpenAI lists it.
#[derive(Debug, Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    /// Unix seconds; the catalog keeps no creation date, so 0.
    created: i64,
    owned_by: &'a str,
}

impl<'a> From<&'a Model> for ModelObject<'a> {
    fn from(model: &'a Model) -> ModelObject<'a> {
        ModelObject {
            id: model.id.as_str(),
            object: "model",
            created: 0,
            owned_by: &model.upstream,
        }
    }
}

#[derive(Debug, Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

/// List the catalog's models (ids only; aliases resolve on use).
pub async fn list_models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let result = async {
        super::caller::authenticate(&gateway, &headers).await?;
        let list = ModelList {
            object: "list",
            data: gateway
                .catalog
                .models()
                .iter()
                .map(ModelObject::from)
                .collect(),
        };
        Ok::<_, GatewayError>(Json(list).into_response())
    }
    .await;
    gateway.answer("models", "", result)
}

/// Describe one model, by id or alias.
pub async fn retrieve_model(
    State(gateway): State<Arc<Gateway>>,
    super::PathParam(name): super::PathParam,
    headers: HeaderMap,
) -> Response {
    let result = async {
        super::caller::authenticate(&gateway, &headers).await?;
        let model = gateway
            .catalog
            .resolve(&name)
            .ok_or_else(|| GatewayError::model_not_found(&name))?;
        Ok::<_, GatewayError>(Json(ModelObject::from(model)).into_response())
    }
    .await;
    gateway.answer("models", "", result)
}
