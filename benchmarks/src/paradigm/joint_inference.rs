//! `jointinference`: the edge model answers, a hard-example mining rule picks samples for the
//! cloud model, served by a real cloud worker on a loopback port and reached over OIP gRPC.
//!
//! Both of Ianvs's orders are supported: `inference-then-mining` (Sedna's default: the edge infers,
//! the rule reads its output) and `mining-then-inference` (the rule reads the input; a hard sample
//! goes only to the cloud). Without a `hard_example_mining_mode`, rules that read the edge output
//! (CrossEntropy, MaxProbability, ...) use the first, and input-only rules (Random, EdgeOnly,
//! CloudOnly) the second, so that `CloudOnly` really is cloud-only.
//!
//! The cloud model's `link` hyperparameter (set per testenv `link` entry by the runner) puts a
//! shaped link ([`crate::link`]) between the edge and the cloud worker; its `protocol`
//! hyperparameter picks the wire: OIP gRPC with raw bytes (`grpc`, the default) or Sedna's JSON
//! over HTTP (`sedna-json`).

use futures::future::BoxFuture;
use sedge_inference_worker::backend;
use sedge_inference_worker::client::{OffloadConfig, OffloadProtocol};
use sedge_inference_worker::edge::EdgeConfig;
use sedge_inference_worker::model::Model;
use sedge_inference_worker::pipeline::MiningMode;
use sedge_inference_worker::server::{self, ServedModel, ServerConfig};

use super::{CaseContext, Paradigm, backend_options, hem_parameters, model_config, run_edge};
use crate::expand::TestCase;
use crate::metrics::Outcome;

/// Edge model + mining rule + cloud model.
pub struct JointInference;

impl Paradigm for JointInference {
    fn name(&self) -> &'static str {
        "jointinference"
    }

    fn required(&self) -> &'static [&'static str] {
        &["edgemodel", "cloudmodel", "hard_example_mining"]
    }

    fn run<'a>(
        &'a self,
        case: &'a TestCase,
        ctx: &'a CaseContext,
    ) -> BoxFuture<'a, Result<Outcome, String>> {
        Box::pin(async move {
            let edge = &case.modules["edgemodel"];
            let cloud = &case.modules["cloudmodel"];
            let hem = &case.modules["hard_example_mining"];
            let cloud_model = Model::load(cloud.url.as_ref().ok_or("cloudmodel has no url")?)
                .map_err(|e| e.to_string())?;
            let cloud_backend =
                backend::load(&cloud_model, &backend_options(cloud)?).map_err(|e| e.to_string())?;
            let name = cloud_model.config.name.clone();
            let served = ServedModel::new(cloud_model.config, cloud_backend, Default::default());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (addr, server) = server::start(
                ([127, 0, 0, 1], 0).into(),
                served,
                ServerConfig::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .map_err(|e| format!("cannot start the cloud worker: {e}"))?;
            let link = match cloud.param("link") {
                None => None,
                Some(n) => Some(ctx.links.get(&n).cloned().ok_or_else(|| {
                    format!("cloudmodel link {n:?} is not one of testenv's links")
                })?),
            };
            let shaped = match link.filter(|l| !l.is_loopback()) {
                Some(l) => Some(
                    crate::link::ShapedLink::start(addr, l)
                        .await
                        .map_err(|e| format!("cannot start the shaped link: {e}"))?,
                ),
                None => None,
            };
            let offload_to = shaped.as_ref().map_or(addr, |l| l.addr);
            let protocol = match cloud.param("protocol") {
                Some(p) => p.parse::<OffloadProtocol>()?,
                None => OffloadProtocol::Grpc,
            };
            let mode = ctx.mining_mode.unwrap_or(
                if matches!(hem.name.as_str(), "Random" | "EdgeOnly" | "CloudOnly") {
                    MiningMode::MiningThenInference
                } else {
                    MiningMode::InferenceThenMining
                },
            );
            let config = EdgeConfig {
                hem_name: hem.name.clone(),
                hem_parameters: hem_parameters(hem),
                mining_mode: mode,
                offload: OffloadConfig {
                    address: Some(offload_to.to_string()),
                    model: name,
                    protocol,
                    ..Default::default()
                },
                ..model_config(edge)?
            };
            let result = run_edge(config, ctx, "inference.jsonl").await;
            drop(shaped);
            let _ = stop.send(());
            let _ = server.await;
            let mut outcome = result?;
            outcome.cloud_only_accuracy = Some(ctx.cloud_only.accuracy(cloud, ctx).await?);
            Ok(outcome)
        })
    }
}
