//! `singletasklearning`: evaluate one base model on the test set (the built-in modules do not
//! train, so Ianvs's train step is skipped and `train_index` is not read).

use futures::future::BoxFuture;

use super::{CaseContext, Paradigm, model_config, run_edge};
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
            let config = model_config(&case.modules["basemodel"])?;
            run_edge(config, ctx, "inference.jsonl").await
        })
    }
}
