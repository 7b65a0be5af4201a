//! Sedge's AI layer on top of the platform.
//!
//! - [`crd`]: the `sedna.io/v1alpha1` resources (Dataset, Model, JointInferenceService,
//!   IncrementalLearningJob) with Sedna's field names, and their generated CRDs.
//! - [`controller`]: the joint-inference controller (`sedge ai-controller`), written with
//!   `kube::runtime::Controller` so it runs against the embedded API server and a real cluster.
//! - [`edge`]: the edge module (plugged into the edge agent through `sedge_edgecore::EdgeModule`):
//!   Sedna's local-controller endpoint for worker reports, and local listeners that carry the edge
//!   worker's connections to the cloud worker through the channel.
//! - [`cloud`]: the cloud module (plugged into the cloud core through
//!   `sedge_cloudcore::CloudModule`): writes the workers' counters into the service's status and
//!   connects routed streams to the cloud worker's pods.
//! - [`wire`]: the messages between the two modules.
//! - [`iljob`]: the IncrementalLearningJob controller (pods, state ConfigMap, conditions);
//!   [`lc`]: its node side (samples, triggers, worker results, deploy).
//! - [`il`]: the IncrementalLearningJob lifecycle as one state machine; [`trigger`]: its stage
//!   triggers (timer window, operators, list-valued metrics); [`collect`]: the node's sample
//!   collection for a job (new dataset lines split by `trainProb`, round lists, durable state).
//!
//! The platform crates know nothing of this crate; it plugs in through CRDs, the channel's
//! message groups and the two module traits.

pub mod cloud;
pub mod collect;
pub mod controller;
pub mod crd;
pub mod edge;
pub mod il;
pub mod iljob;
pub mod lc;
pub mod metrics;
mod podspec;
pub mod trigger;
mod verdict;
pub mod wire;

#[cfg(test)]
mod contract_tests {
    #[test]
    fn the_pod_token_variable_is_the_platforms() {
        assert_eq!(
            sedge_worker_contract::env::POD_TOKEN,
            sedge_edgecore::podtoken::ENV
        );
    }
}
