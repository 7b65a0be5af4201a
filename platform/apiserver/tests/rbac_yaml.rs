//! The components' RBAC for a real cluster is committed as YAML generated from the roles the
//! embedded server gives them (`authz::bootstrap_policy`), and must not drift from them.

use sedge_apiserver::authz::{AI_CONTROLLER_USER, CLOUDCORE_USER, component_rbac_yaml};

const FILES: [(&str, &str); 2] = [
    (CLOUDCORE_USER, "../cloudcore/deploy/rbac.yaml"),
    (AI_CONTROLLER_USER, "../../ai-controller/deploy/rbac.yaml"),
];

#[test]
fn committed_rbac_matches_the_embedded_roles() {
    for (component, rel) in FILES {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        let generated = component_rbac_yaml(component).unwrap();
        if std::env::var_os("SEDGE_WRITE_RBAC").is_some() {
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from the role in authz.rs; regenerate it with \
             `SEDGE_WRITE_RBAC=1 cargo test -p sedge-apiserver --test rbac_yaml`",
            path.display()
        );
    }
    assert!(component_rbac_yaml("nobody").is_none());
}
