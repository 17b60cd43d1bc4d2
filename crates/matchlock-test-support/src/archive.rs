//! Builders for layer tars, `docker save` archives and OCI image-layout archives.

use std::io::{self, Write};

use flate2::{write::GzEncoder, Compression};
use serde_json::json;
use sha2::{Digest, Sha256};

/// What a layer entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    HardLink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
}

/// One entry of a layer tar. `path` is written verbatim (no normalisation, no validation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    fn new(path: &str, kind: Kind, mode: u32) -> Self {
        Entry {
            path: path.to_owned(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            xattrs: Vec::new(),
        }
    }
    /// A regular file, mode 0644.
    pub fn file(path: &str, content: impl Into<Vec<u8>>) -> Self {
        Self::new(path, Kind::File(content.into()), 0o644)
    }
    /// A directory, mode 0755.
    pub fn dir(path: &str) -> Self {
        Self::new(path, Kind::Dir, 0o755)
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        Self::new(path, Kind::Symlink(target.to_owned()), 0o777)
    }
    pub fn hardlink(path: &str, target: &str) -> Self {
        Self::new(path, Kind::HardLink(target.to_owned()), 0o644)
    }
    pub fn char_dev(path: &str, major: u32, minor: u32) -> Self {
        Self::new(path, Kind::CharDev(major, minor), 0o666)
    }
    pub fn block_dev(path: &str, major: u32, minor: u32) -> Self {
        Self::new(path, Kind::BlockDev(major, minor), 0o660)
    }
    pub fn fifo(path: &str) -> Self {
        Self::new(path, Kind::Fifo, 0o644)
    }
    /// The whiteout marker deleting `path` from lower layers (`dir/.wh.name`).
    pub fn whiteout(path: &str) -> Self {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        Self::file(&format!("{dir}.wh.{name}"), Vec::new())
    }
    /// The opaque marker hiding all lower-layer children of `dir`.
    pub fn opaque(dir: &str) -> Self {
        Self::file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            Vec::new(),
        )
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.push((name.to_owned(), value.to_vec()));
        self
    }
}

/// The runtime config of an image (`config` in the OCI config JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpec {
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// A whole image: layers (base first) plus config, and packaging knobs.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    pub layers: Vec<Vec<Entry>>,
    pub config: ConfigSpec,
    /// gzip the layer blobs.
    pub gzip: bool,
    /// zstd-compress the layer blobs (wins over `gzip`).
    pub zstd: bool,
    /// Registry pushes: Docker v2 schema 2 media types instead of OCI ones.
    pub docker_media_types: bool,
    /// `docker save`: name layers `blobs/sha256/<hex>` (Docker 25+) instead of `<id>/layer.tar`.
    pub docker_blobs: bool,
    /// Record a wrong diff id for this layer index in the config.
    pub corrupt_diff_id: Option<usize>,
    /// OCI: flip one byte of this layer blob after computing its digest.
    pub corrupt_blob: Option<usize>,
    /// OCI: also list a linux/arm64 manifest (first in the index) whose config has
    /// `Cmd ["arm64"]`.
    pub extra_arm64: bool,
    /// Tag recorded in `RepoTags` / the OCI ref annotation.
    pub repo_tag: Option<String>,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = 3 + key.len() + value.len();
    let mut len = rest + 1;
    while len.to_string().len() + rest > len {
        len += 1;
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn put_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// Appends one raw entry (PAX header first when needed) to `out`.
fn append_raw<W: Write>(b: &mut tar::Builder<W>, e: &Entry) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    let (ty, data, link): (tar::EntryType, &[u8], Option<&str>) = match &e.kind {
        Kind::File(c) => (tar::EntryType::Regular, c, None),
        Kind::Dir => (tar::EntryType::Directory, &[], None),
        Kind::Symlink(t) => (tar::EntryType::Symlink, &[], Some(t)),
        Kind::HardLink(t) => (tar::EntryType::Link, &[], Some(t)),
        Kind::CharDev(..) => (tar::EntryType::Char, &[], None),
        Kind::BlockDev(..) => (tar::EntryType::Block, &[], None),
        Kind::Fifo => (tar::EntryType::Fifo, &[], None),
    };
    let mut pax = Vec::new();
    if e.path.len() > 99 {
        pax_record(&mut pax, "path", e.path.as_bytes());
    }
    if let Some(t) = link {
        if t.len() > 99 {
            pax_record(&mut pax, "linkpath", t.as_bytes());
        }
        put_field(&mut header.as_old_mut().linkname, t.as_bytes());
    }
    for (k, v) in &e.xattrs {
        pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
    }
    if !pax.is_empty() {
        let mut ph = tar::Header::new_ustar();
        ph.set_entry_type(tar::EntryType::XHeader);
        ph.set_size(pax.len() as u64);
        put_field(&mut ph.as_old_mut().name, b"PaxHeader");
        ph.set_mode(0o644);
        ph.set_cksum();
        b.append(&ph, pax.as_slice())?;
    }
    put_field(&mut header.as_old_mut().name, e.path.as_bytes());
    header.set_entry_type(ty);
    header.set_mode(e.mode);
    header.set_uid(e.uid);
    header.set_gid(e.gid);
    header.set_mtime(e.mtime);
    header.set_size(data.len() as u64);
    if let Kind::CharDev(ma, mi) | Kind::BlockDev(ma, mi) = e.kind {
        header.set_device_major(ma)?;
        header.set_device_minor(mi)?;
    }
    header.set_cksum();
    b.append(&header, data)
}

/// An uncompressed layer tar holding `entries` in order, written verbatim.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        // Writing into a Vec cannot fail except on device numbers that do not fit.
        append_raw(&mut b, e).unwrap_or_else(|err| panic!("building entry {:?}: {err}", e.path));
    }
    b.into_inner()
        .unwrap_or_else(|err| panic!("finishing layer: {err}"))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(data).unwrap_or_else(|e| panic!("gzip: {e}"));
    enc.finish().unwrap_or_else(|e| panic!("gzip: {e}"))
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let e = Entry::file(path, data.to_vec());
    append_raw(b, &e).unwrap_or_else(|err| panic!("adding {path}: {err}"));
}

struct Built {
    /// (diff id hex, blob bytes, blob hex)
    layers: Vec<(String, Vec<u8>, String)>,
}

impl ImageSpec {
    pub fn new(layers: Vec<Vec<Entry>>) -> Self {
        ImageSpec {
            layers,
            ..Default::default()
        }
    }

    fn build_layers(&self) -> Built {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, entries)| {
                let raw = layer_tar(entries);
                let diff = sha256_hex(&raw);
                let mut blob = if self.zstd {
                    zstd::encode_all(raw.as_slice(), 3).unwrap_or_else(|e| panic!("zstd: {e}"))
                } else if self.gzip {
                    gzip(&raw)
                } else {
                    raw
                };
                let blob_hex = sha256_hex(&blob);
                if self.corrupt_blob == Some(i) {
                    let mid = blob.len() / 2;
                    blob[mid] ^= 0xff;
                }
                (diff, blob, blob_hex)
            })
            .collect();
        Built { layers }
    }

    fn config_json(&self, built: &Built, cmd_override: Option<&[String]>, arch: &str) -> Vec<u8> {
        let diff_ids: Vec<String> = built
            .layers
            .iter()
            .enumerate()
            .map(|(i, (d, _, _))| {
                if self.corrupt_diff_id == Some(i) {
                    format!("sha256:{}", sha256_hex(d.as_bytes()))
                } else {
                    format!("sha256:{d}")
                }
            })
            .collect();
        let c = &self.config;
        let v = json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "User": c.user,
                "WorkingDir": c.working_dir,
                "Env": c.env,
                "Entrypoint": if c.entrypoint.is_empty() { serde_json::Value::Null } else { json!(c.entrypoint) },
                "Cmd": cmd_override.unwrap_or(&c.cmd),
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        v.to_string().into_bytes()
    }

    /// A `docker save` archive (`manifest.json`, `<config-hex>.json`, layers).
    pub fn docker_save(&self) -> Vec<u8> {
        let built = self.build_layers();
        let config = self.config_json(&built, None, "amd64");
        let config_hex = sha256_hex(&config);
        let mut b = tar::Builder::new(Vec::new());
        let mut layer_paths = Vec::new();
        for (diff, blob, blob_hex) in &built.layers {
            let path = if self.docker_blobs {
                format!("blobs/sha256/{blob_hex}")
            } else {
                format!("{diff}/layer.tar")
            };
            if !layer_paths.contains(&path) {
                add_file(&mut b, &path, blob);
            }
            layer_paths.push(path);
        }
        let config_path = if self.docker_blobs {
            format!("blobs/sha256/{config_hex}")
        } else {
            format!("{config_hex}.json")
        };
        add_file(&mut b, &config_path, &config);
        let tags: Vec<&String> = self.repo_tag.iter().collect();
        let manifest = json!([{ "Config": config_path, "RepoTags": tags, "Layers": layer_paths }]);
        add_file(&mut b, "manifest.json", manifest.to_string().as_bytes());
        b.into_inner()
            .unwrap_or_else(|e| panic!("finishing archive: {e}"))
    }

    /// An OCI image-layout archive (`oci-layout`, `index.json`, `blobs/sha256/...`).
    pub fn oci_layout(&self) -> Vec<u8> {
        let built = self.build_layers();
        let mut b = tar::Builder::new(Vec::new());
        add_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        let layer_type = if self.gzip {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        let mut written = Vec::new();
        let mut put_blob = |b: &mut tar::Builder<Vec<u8>>, hex: &str, data: &[u8]| {
            if !written.iter().any(|w: &String| w == hex) {
                add_file(b, &format!("blobs/sha256/{hex}"), data);
                written.push(hex.to_owned());
            }
        };
        let layers_desc: Vec<_> = built
            .layers
            .iter()
            .map(|(_, blob, hex)| json!({"mediaType": layer_type, "digest": format!("sha256:{hex}"), "size": blob.len()}))
            .collect();
        for (_, blob, hex) in &built.layers {
            put_blob(&mut b, hex, blob);
        }
        let mut index_entries = Vec::new();
        let mut platforms: Vec<(&str, Option<Vec<String>>)> = Vec::new();
        if self.extra_arm64 {
            platforms.push(("arm64", Some(vec!["arm64".to_owned()])));
        }
        platforms.push(("amd64", None));
        for (arch, cmd) in platforms {
            let config = self.config_json(&built, cmd.as_deref(), arch);
            let config_hex = sha256_hex(&config);
            put_blob(&mut b, &config_hex, &config);
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_hex}"), "size": config.len()},
                "layers": layers_desc,
            })
            .to_string()
            .into_bytes();
            let manifest_hex = sha256_hex(&manifest);
            put_blob(&mut b, &manifest_hex, &manifest);
            let mut desc = json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_hex}"),
                "size": manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            });
            if let Some(tag) = &self.repo_tag {
                desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
            }
            index_entries.push(desc);
        }
        let index = json!({"schemaVersion": 2, "manifests": index_entries});
        add_file(&mut b, "index.json", index.to_string().as_bytes());
        b.into_inner()
            .unwrap_or_else(|e| panic!("finishing archive: {e}"))
    }
}

/// An image as a registry stores it: blobs, then manifests to push by digest, then the
/// document to push under the tag.
#[derive(Clone, Debug)]
pub struct RegistryParts {
    /// (`sha256:<hex>`, bytes): layer blobs and config blobs.
    pub blobs: Vec<(String, Vec<u8>)>,
    /// (`sha256:<hex>`, media type, bytes): per-platform manifests of an index.
    pub manifests: Vec<(String, String, Vec<u8>)>,
    /// (media type, bytes): the manifest or index the tag points at.
    pub top: (String, Vec<u8>),
}

impl ImageSpec {
    /// The registry form of the image (`extra_arm64` makes the top an index).
    pub fn registry_parts(&self) -> RegistryParts {
        let built = self.build_layers();
        let docker = self.docker_media_types;
        let layer_type = match (docker, self.zstd, self.gzip) {
            (true, true, _) => "application/vnd.docker.image.rootfs.diff.tar.zstd",
            (true, false, true) => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            (true, false, false) => "application/vnd.docker.image.rootfs.diff.tar",
            (false, true, _) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (false, false, true) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (false, false, false) => "application/vnd.oci.image.layer.v1.tar",
        };
        let (manifest_type, config_type, index_type) = if docker {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json",
            )
        } else {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.index.v1+json",
            )
        };
        let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
        for (_, blob, hex) in &built.layers {
            let d = format!("sha256:{hex}");
            if !blobs.iter().any(|(x, _)| *x == d) {
                blobs.push((d, blob.clone()));
            }
        }
        let layers_desc: Vec<_> = built
            .layers
            .iter()
            .map(|(_, blob, hex)| json!({"mediaType": layer_type, "digest": format!("sha256:{hex}"), "size": blob.len()}))
            .collect();
        let mut platforms: Vec<(&str, Option<Vec<String>>)> = Vec::new();
        if self.extra_arm64 {
            platforms.push(("arm64", Some(vec!["arm64".to_owned()])));
        }
        platforms.push(("amd64", None));
        let mut manifests = Vec::new();
        for (arch, cmd) in platforms {
            let config = self.config_json(&built, cmd.as_deref(), arch);
            let config_digest = format!("sha256:{}", sha256_hex(&config));
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": {"mediaType": config_type, "digest": config_digest, "size": config.len()},
                "layers": layers_desc,
            })
            .to_string()
            .into_bytes();
            blobs.push((config_digest, config));
            manifests.push((
                format!("sha256:{}", sha256_hex(&manifest)),
                arch.to_owned(),
                manifest,
            ));
        }
        if !self.extra_arm64 {
            let (_, _, m) = manifests.remove(0);
            return RegistryParts {
                blobs,
                manifests: Vec::new(),
                top: (manifest_type.to_owned(), m),
            };
        }
        let entries: Vec<_> = manifests
            .iter()
            .map(|(d, arch, m)| {
                json!({"mediaType": manifest_type, "digest": d, "size": m.len(),
                       "platform": {"architecture": arch, "os": "linux"}})
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
            .to_string()
            .into_bytes();
        RegistryParts {
            blobs,
            manifests: manifests
                .into_iter()
                .map(|(d, _, m)| (d, manifest_type.to_owned(), m))
                .collect(),
            top: (index_type.to_owned(), index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar_bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn layer_tar_writes_hostile_and_long_names_verbatim() {
        let long = format!("d/{}", "x".repeat(150));
        let t = layer_tar(&[
            Entry::file("../../etc/evil", b"x".to_vec()),
            Entry::file(&long, b"y".to_vec()).xattr("user.k", b"v"),
            Entry::whiteout("a/b"),
            Entry::opaque("c/"),
        ]);
        let mut a = tar::Archive::new(t.as_slice());
        let mut seen = Vec::new();
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            let p = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            if p == long {
                let x: Vec<_> = e
                    .pax_extensions()
                    .expect("pax")
                    .expect("some pax")
                    .collect();
                assert!(x
                    .iter()
                    .any(|r| r.as_ref().expect("rec").key() == Ok("SCHILY.xattr.user.k")));
            }
            seen.push(p);
        }
        assert_eq!(
            seen,
            vec![
                "../../etc/evil".to_owned(),
                long,
                "a/.wh.b".into(),
                "c/.wh..wh..opq".into()
            ]
        );
    }

    #[test]
    fn docker_save_and_oci_have_expected_members() {
        let spec = ImageSpec::new(vec![vec![Entry::file("a", b"1".to_vec())]]);
        let d = names(&spec.docker_save());
        assert!(d.contains(&"manifest.json".to_owned()));
        assert!(d.iter().any(|n| n.ends_with("/layer.tar")));
        let o = names(&spec.oci_layout());
        assert!(o.contains(&"index.json".to_owned()) && o.contains(&"oci-layout".to_owned()));
        assert_eq!(
            o.iter().filter(|n| n.starts_with("blobs/sha256/")).count(),
            3
        );
    }
}
