//! `singletasklearning`: evaluate one base model on the test set (the built-in modules do not
//! train, so Ianvs's train step is skipped and `train_index` is not read).

use futures::future::BoxFuture;
use sedge_inference_worker::edge::EdgeConfig;

use super::{CaseContext, Paradigm, backend_options, batch_size, run_edge};
use crate::expand::TestCase;
use crate::metrics::Outcome;

/// Evaluates a `basemodel`.
pub struct SingleTaskLearning;

impl Paradigm for SingleTaskLearning {
    fn name(&self) -> &'static str {
        "singletasklearning"
    }

    fn required(&self) -> &'static [&'static str] {
        &["basemodel"]
    }

    fn run<'a>(
        &'a self,
        case: &'a TestCase,
        ctx: &'a CaseContext,
    ) -> BoxFuture<'a, Result<Outcome, String>> {
        Box::pin(async move {
            let base = &case.modules["basemodel"];
            let model = base.url.clone().ok_or("basemodel has no url")?;
            let config = EdgeConfig {
                model,
                backend: backend_options(base)?,
                hem_name: "EdgeOnly".into(),
                hem_parameters: String::new(),
                batch: batch_size(base),
                ..Default::default()
            };
            run_edge(config, ctx, "inference.jsonl").await
        })
    }
}
