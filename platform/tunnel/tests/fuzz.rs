//! The channel's decoders under mutated input: frames (length prefix and cap) and messages
//! (protobuf). Whatever the bytes, a decoder answers Ok or an error, never panics, and a frame
//! never makes the reader allocate past the cap.

use sedge_tunnel::frame::{self, FrameError};
use sedge_tunnel::{Message, op};

fn seeds() -> Vec<Vec<u8>> {
    let mut m = Message::new(
        "resource",
        op::UPDATE,
        "default/pod/web-1",
        r#"{"spec":{}}"#,
    )
    .with_version("42");
    m.parent_id = "parent".into();
    let hello = Message::new("hub", op::HELLO, "", r#"{"node":"edge-1"}"#).unacked();
    vec![m.encode().to_vec(), hello.encode().to_vec()]
}

#[test]
fn messages() {
    let seeds = seeds();
    let refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    let stats = sedge_testkit::fuzz::run(&refs, 20_000, |b| {
        let Ok(m) = Message::decode(b) else {
            return false;
        };
        // Whatever decoded must survive the checks the hub makes on it.
        let _ = sedge_tunnel::hub::authorize("edge-1", &m, None);
        let _ = m.to_json();
        true
    });
    eprintln!("{stats:?}");
    assert!(
        stats.accepted > 0 && stats.accepted < stats.inputs,
        "{stats:?}"
    );
}

#[test]
fn frames() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut framed = Vec::new();
    for s in seeds() {
        frame::append_frame(&mut framed, &s);
    }
    let cap = 1024;
    let stats = sedge_testkit::fuzz::run(&[&framed], 20_000, |b| {
        let mut r = b;
        let mut frames = 0;
        loop {
            match rt.block_on(frame::read_frame(&mut r, cap)) {
                Ok(Some(f)) => {
                    assert!(f.len() <= cap);
                    frames += 1;
                }
                Ok(None) => return frames > 0,
                Err(FrameError::TooLarge { claimed, .. }) => {
                    assert!(claimed as usize > cap);
                    return false;
                }
                Err(_) => return false,
            }
        }
    });
    eprintln!("{stats:?}");
    assert!(stats.accepted > 0, "{stats:?}");
}
