//! OCI image archives without a registry or a build daemon: one layer of files from this host,
//! an image config (entrypoint, cmd, env), written as an OCI image layout tarball that
//! `ctr images import` (and `skopeo`) read. `sedge images build` makes Sedge's images with it.
//!
//! The layer is an uncompressed tar (media type `application/vnd.oci.image.layer.v1.tar`):
//! the archive is imported on the same machine, where gzip would only cost time.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

/// A file in an image.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A file copied from this host (mode kept).
    File(PathBuf),
    /// A file with these bytes and this mode.
    Bytes(Vec<u8>, u32),
    /// A symbolic link to this target.
    Link(String),
    /// A directory with this mode.
    Dir(u32),
}

/// An image to write.
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// The reference it is imported as (`docker.io/library/busybox:1.36`, `localhost/pause:local`).
    pub reference: String,
    /// More references for the same image (`docker.io/library/busybox:latest`).
    pub also: Vec<String>,
    /// Absolute path in the image -> what is there. Parent directories are made.
    pub files: BTreeMap<String, Entry>,
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// Environment (`KEY=value`).
    pub env: Vec<String>,
    /// Working directory.
    pub working_dir: String,
}

/// Hashes what is written through it.
struct Sha<W> {
    inner: W,
    ctx: ring::digest::Context,
    len: u64,
}

impl<W: Write> Write for Sha<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

fn io(what: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", what.display())
}

impl Image {
    /// Writes the image as an OCI layout archive at `out`.
    pub fn write(&self, out: &Path) -> Result<(), String> {
        if self.reference.is_empty() {
            return Err("an image needs a reference".into());
        }
        // The layer goes to a temporary file beside `out` first (it may be large), hashed as
        // it is written.
        let dir = out.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let layer_file = tempfile::NamedTempFile::new_in(dir).map_err(|e| io(dir, e))?;
        let (layer_digest, layer_len) = {
            let mut sha = Sha {
                inner: std::io::BufWriter::new(layer_file.as_file()),
                ctx: ring::digest::Context::new(&ring::digest::SHA256),
                len: 0,
            };
            self.write_layer(&mut sha)?;
            sha.flush().map_err(|e| io(out, e))?;
            (hex(sha.ctx.finish().as_ref()), sha.len)
        };
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": self.working_dir,
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
            "history": [{"created_by": "sedge images build"}],
        }))
        .map_err(|e| e.to_string())?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{}", sha256(&config)), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": format!("sha256:{layer_digest}"), "size": layer_len}],
        }))
        .map_err(|e| e.to_string())?;
        let manifests: Vec<serde_json::Value> = std::iter::once(&self.reference)
            .chain(&self.also)
            .map(|r| {
                json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{}", sha256(&manifest)),
                    "size": manifest.len(),
                    "annotations": {
                        "io.containerd.image.name": r,
                        "org.opencontainers.image.ref.name": r.rsplit(':').next().filter(|t| !t.contains('/')).unwrap_or("latest"),
                    },
                })
            })
            .collect();
        let index = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))
            .map_err(|e| e.to_string())?;

        let tmp = out.with_extension("tar.partial");
        let f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        let mut t = tar::Builder::new(std::io::BufWriter::new(f));
        let mut add = |name: &str, data: &mut dyn Read, len: u64| -> Result<(), String> {
            let mut h = tar::Header::new_ustar();
            h.set_size(len);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            t.append_data(&mut h, name, data).map_err(|e| io(&tmp, e))
        };
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        add("oci-layout", &mut &layout[..], layout.len() as u64)?;
        add("index.json", &mut &index[..], index.len() as u64)?;
        add(
            &format!("blobs/sha256/{}", sha256(&manifest)),
            &mut &manifest[..],
            manifest.len() as u64,
        )?;
        add(
            &format!("blobs/sha256/{}", sha256(&config)),
            &mut &config[..],
            config.len() as u64,
        )?;
        let mut layer = std::fs::File::open(layer_file.path()).map_err(|e| io(out, e))?;
        add(
            &format!("blobs/sha256/{layer_digest}"),
            &mut layer,
            layer_len,
        )?;
        t.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| io(out, e))
    }

    fn write_layer(&self, w: &mut dyn Write) -> Result<(), String> {
        let mut t = tar::Builder::new(w);
        t.follow_symlinks(false);
        let mut dirs: std::collections::BTreeSet<String> = Default::default();
        for path in self.files.keys() {
            let mut p = Path::new(path.trim_start_matches('/'));
            while let Some(parent) = p.parent() {
                if parent.as_os_str().is_empty() {
                    break;
                }
                dirs.insert(parent.display().to_string());
                p = parent;
            }
        }
        let header = |kind: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h
        };
        let err = |p: &str, e: std::io::Error| format!("image {}: {p}: {e}", self.reference);
        for d in &dirs {
            if self.files.contains_key(&format!("/{d}")) {
                continue;
            }
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            t.append_data(&mut h, format!("{d}/"), std::io::empty())
                .map_err(|e| err(d, e))?;
        }
        for (path, entry) in &self.files {
            let name = path.trim_start_matches('/');
            match entry {
                Entry::File(src) => {
                    use std::os::unix::fs::PermissionsExt;
                    let f = std::fs::File::open(src).map_err(|e| io(src, e))?;
                    let meta = f.metadata().map_err(|e| io(src, e))?;
                    let mut h = header(
                        tar::EntryType::Regular,
                        meta.permissions().mode() & 0o7777,
                        meta.len(),
                    );
                    t.append_data(&mut h, name, f).map_err(|e| err(name, e))?;
                }
                Entry::Bytes(b, mode) => {
                    let mut h = header(tar::EntryType::Regular, *mode, b.len() as u64);
                    t.append_data(&mut h, name, &b[..])
                        .map_err(|e| err(name, e))?;
                }
                Entry::Link(target) => {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    t.append_link(&mut h, name, target)
                        .map_err(|e| err(name, e))?;
                }
                Entry::Dir(mode) => {
                    let mut h = header(tar::EntryType::Directory, *mode, 0);
                    t.append_data(&mut h, format!("{name}/"), std::io::empty())
                        .map_err(|e| err(name, e))?;
                }
            }
        }
        t.into_inner().map_err(|e| err("", e))?;
        Ok(())
    }

    /// Adds a host binary and the shared libraries `ldd` lists for it (at the same paths, as
    /// files: a linked directory such as `/lib64` is a directory in the image), so a dynamically
    /// linked program runs in an image of its own.
    pub fn add_binary(&mut self, host: &Path, at: &str) -> Result<(), String> {
        self.files
            .insert(at.to_string(), Entry::File(host.to_path_buf()));
        let out = std::process::Command::new("ldd")
            .arg(host)
            .output()
            .map_err(|e| format!("ldd {}: {e}", host.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not a dynamic executable") || !out.status.success() {
            return Ok(());
        }
        for line in text.lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            let Some(p) = path.filter(|p| p.starts_with('/')) else {
                continue;
            };
            let real = std::fs::canonicalize(p).map_err(|e| format!("{p}: {e}"))?;
            self.files.insert(p.to_string(), Entry::File(real));
        }
        Ok(())
    }
}

/// A busybox image from the busybox on this host: `/bin/busybox` and a link per applet,
/// `CMD ["sh"]`.
pub fn busybox(busybox: &Path, reference: &str) -> Result<Image, String> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| format!("{} --list: {e}", busybox.display()))?;
    if !out.status.success() {
        return Err(format!("{} --list failed", busybox.display()));
    }
    let mut img = Image {
        reference: reference.into(),
        cmd: vec!["sh".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..Default::default()
    };
    // A static busybox (busybox-static) is one file; a dynamic one brings its libraries.
    img.add_binary(busybox, "/bin/busybox")?;
    for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            img.files
                .insert(format!("/bin/{applet}"), Entry::Link("busybox".into()));
        }
    }
    for d in ["/tmp", "/root", "/etc", "/proc", "/sys", "/dev"] {
        img.files.insert(
            d.into(),
            Entry::Dir(if d == "/tmp" { 0o1777 } else { 0o755 }),
        );
    }
    img.files.insert(
        "/etc/passwd".into(),
        Entry::Bytes(b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644),
    );
    img.files.insert(
        "/etc/group".into(),
        Entry::Bytes(b"root:x:0:\n".to_vec(), 0o644),
    );
    Ok(img)
}

/// The busybox image examples and tests use: `busybox:1.36`, also tagged `latest`.
pub fn busybox_image(busybox: &Path) -> Result<Image, String> {
    let mut img = self::busybox(busybox, "docker.io/library/busybox:1.36")?;
    img.also = vec!["docker.io/library/busybox:latest".into()];
    Ok(img)
}

/// The pause image for pod sandboxes: busybox's `sleep infinity`.
pub fn pause(busybox: &Path, reference: &str) -> Result<Image, String> {
    let mut img = self::busybox(busybox, reference)?;
    img.cmd = vec![];
    img.entrypoint = vec!["/bin/sleep".into(), "infinity".into()];
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_oci_layout_whose_digests_match() {
        let d = tempfile::tempdir().unwrap();
        let mut img = Image {
            reference: "localhost/test:v1".into(),
            cmd: vec!["hello".into()],
            ..Default::default()
        };
        img.files.insert(
            "/usr/bin/hello".into(),
            Entry::Bytes(b"#!/bin/sh\necho hi\n".to_vec(), 0o755),
        );
        img.files
            .insert("/bin/hi".into(), Entry::Link("/usr/bin/hello".into()));
        let out = d.path().join("img.tar");
        img.write(&out).unwrap();
        let mut blobs = BTreeMap::new();
        let mut a = tar::Archive::new(std::fs::File::open(&out).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            blobs.insert(e.path().unwrap().display().to_string(), b);
        }
        for (name, b) in &blobs {
            if let Some(d) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256(b), d, "{name}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&blobs["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "localhost/test:v1"
        );
        let manifest: serde_json::Value = serde_json::from_slice(
            &blobs[&format!(
                "blobs/sha256/{}",
                m["digest"].as_str().unwrap().trim_start_matches("sha256:")
            )],
        )
        .unwrap();
        let layer = &blobs[&format!(
            "blobs/sha256/{}",
            manifest["layers"][0]["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
        )];
        let mut names = Vec::new();
        let mut a = tar::Archive::new(&layer[..]);
        for e in a.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert!(names.contains(&"usr/bin/hello".to_string()), "{names:?}");
        assert!(names.contains(&"usr/bin/".to_string()), "{names:?}");
        assert!(names.contains(&"bin/hi".to_string()), "{names:?}");
        assert!(Image::default().write(&out).is_err());
    }
}
