//! Random operation sequences (fixed seeds) against `MemFs` and a simple path-map model: after
//! every step both agree on success or errno, and periodically on the whole tree.

mod provider_harness;

use std::collections::BTreeMap;

use fuse_backend_rs::api::filesystem::FileSystem;
use matchlock_vfs::memory::MemFs;
use provider_harness::*;

type Path = Vec<&'static str>;

#[derive(Debug, Clone, PartialEq)]
enum M {
    Dir,
    File(Vec<u8>),
}

/// The model: every path and what it is; the root is the empty path.
struct Model(BTreeMap<Path, M>);

impl Model {
    fn parent_ok(&self, p: &Path) -> Result<(), i32> {
        // Every proper prefix must be a directory.
        for i in 0..p.len() {
            match self.0.get(&p[..i]) {
                Some(M::Dir) => {}
                Some(M::File(_)) => return Err(libc::ENOTDIR),
                None => return Err(libc::ENOENT),
            }
        }
        Ok(())
    }

    fn children(&self, p: &Path) -> Vec<Path> {
        self.0
            .keys()
            .filter(|k| k.len() > p.len() && k[..p.len()] == p[..])
            .cloned()
            .collect()
    }

    fn rename(&mut self, src: &Path, dst: &Path) -> Result<(), i32> {
        // Like the kernel: both parents are resolved before the source is looked at.
        self.parent_ok(src)?;
        self.parent_ok(dst)?;
        let s = self.0.get(src).cloned().ok_or(libc::ENOENT)?;
        if s == M::Dir && dst.len() > src.len() && dst[..src.len()] == src[..] {
            return Err(libc::EINVAL);
        }
        if src == dst {
            return Ok(());
        }
        match (&s, self.0.get(dst)) {
            (M::Dir, Some(M::File(_))) => return Err(libc::ENOTDIR),
            (M::File(_), Some(M::Dir)) => return Err(libc::EISDIR),
            (M::Dir, Some(M::Dir)) if !self.children(dst).is_empty() => {
                return Err(libc::ENOTEMPTY)
            }
            _ => {}
        }
        self.0.remove(dst);
        let moved: Vec<Path> = std::iter::once(src.clone())
            .chain(self.children(src))
            .collect();
        for old in moved {
            let v = self.0.remove(&old).expect("listed");
            let mut new = dst.clone();
            new.extend_from_slice(&old[src.len()..]);
            self.0.insert(new, v);
        }
        Ok(())
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn path(&mut self) -> Path {
        const NAMES: [&str; 4] = ["a", "b", "c", "d"];
        let depth = 1 + self.below(3) as usize;
        (0..depth).map(|_| NAMES[self.below(4) as usize]).collect()
    }
}

/// Resolves the parent directory of `p` in the provider.
fn parent_ino(fs: &MemFs, p: &Path) -> Result<u64, i32> {
    let mut ino = ROOT;
    for name in &p[..p.len() - 1] {
        ino = lookup(fs, ino, name)
            .map_err(|e| e.raw_os_error().unwrap_or(0))?
            .inode;
    }
    // The kernel resolves the parent as a directory before it sends the request.
    if getattr(fs, ino).st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(libc::ENOTDIR);
    }
    Ok(ino)
}

fn code<T>(r: std::io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn step(fs: &MemFs, rng: &mut Rng) -> (String, Result<(), i32>) {
    let p = rng.path();
    let name = *p.last().expect("non-empty");
    let op = rng.below(7);
    let desc = format!("op {op} on {p:?}");
    let got = parent_ino(fs, &p).and_then(|dir| match op {
        0 => code(create(fs, dir, name, 0o644, libc::O_RDWR as u32))
            .map(|(e, fh)| release(fs, e.inode, fh)),
        1 => code(mkdir(fs, dir, name)).map(|_| ()),
        2 => code(fs.unlink(&root(), dir, &c(name))),
        3 => code(fs.rmdir(&root(), dir, &c(name))),
        4 | 5 => {
            let ino = code(lookup(fs, dir, name))?.inode;
            let fh = code(open(fs, ino, libc::O_RDWR as u32))?;
            let r = if op == 4 {
                let off = rng.below(150_000);
                let data: Vec<u8> = (0..rng.below(70_000))
                    .map(|i| (i % 253) as u8 + 1)
                    .collect();
                code(write(fs, ino, fh, off, &data)).map(|_| ())
            } else {
                code(set_size(fs, ino, rng.below(200_000))).map(|_| ())
            };
            release(fs, ino, fh);
            r
        }
        _ => {
            let dst = rng.path();
            let ddir = parent_ino(fs, &dst)?;
            code(rename(fs, dir, name, ddir, dst.last().expect("name"), 0))
        }
    });
    (desc, got)
}

#[test]
fn random_operation_sequences_match_the_model() {
    for seed in [0x9e37_79b9_7f4a_7c15u64, 42, 7_777_777] {
        run(seed, 1500);
    }
}

fn run(seed: u64, steps: usize) {
    let fs = MemFs::new(1 << 30);
    let mut m = Model(BTreeMap::from([(Vec::new(), M::Dir)]));
    let mut rng = Rng(seed);
    for i in 0..steps {
        // The model runs with a cloned generator so both sides see the same random choices.
        let mut mrng = Rng(rng.0);
        let (desc, got) = step(&fs, &mut rng);
        let want = model_step(&mut m, &mut mrng);
        if got != want {
            compare(&fs, &m, seed, i);
        }
        assert_eq!(got, want, "seed {seed} step {i}: {desc}");
        if i % 100 == 99 {
            compare(&fs, &m, seed, i);
        }
    }
    compare(&fs, &m, seed, steps);
}

fn model_step(m: &mut Model, rng: &mut Rng) -> Result<(), i32> {
    let p = rng.path();
    let op = rng.below(7);
    m.parent_ok(&p)?;
    let exists = m.0.get(&p).cloned();
    match op {
        0 => match exists {
            Some(M::Dir) => Err(libc::EISDIR),
            Some(M::File(_)) => Ok(()),
            None => {
                m.0.insert(p, M::File(Vec::new()));
                Ok(())
            }
        },
        1 => match exists {
            Some(_) => Err(libc::EEXIST),
            None => {
                m.0.insert(p, M::Dir);
                Ok(())
            }
        },
        2 => match exists {
            Some(M::Dir) => Err(libc::EISDIR),
            Some(M::File(_)) => {
                m.0.remove(&p);
                Ok(())
            }
            None => Err(libc::ENOENT),
        },
        3 => match exists {
            Some(M::Dir) if !m.children(&p).is_empty() => Err(libc::ENOTEMPTY),
            Some(M::Dir) => {
                m.0.remove(&p);
                Ok(())
            }
            Some(M::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        },
        4 | 5 => {
            let Some(M::File(mut data)) = exists else {
                return match exists {
                    None => Err(libc::ENOENT),
                    _ => Err(libc::EISDIR),
                };
            };
            if op == 4 {
                let off = rng.below(150_000) as usize;
                let new: Vec<u8> = (0..rng.below(70_000))
                    .map(|i| (i % 253) as u8 + 1)
                    .collect();
                if data.len() < off + new.len() {
                    data.resize(off + new.len(), 0);
                }
                data[off..off + new.len()].copy_from_slice(&new);
            } else {
                data.resize(rng.below(200_000) as usize, 0);
            }
            m.0.insert(p, M::File(data));
            Ok(())
        }
        _ => {
            let dst = rng.path();
            m.rename(&p, &dst)
        }
    }
}

/// Walks the provider's tree and checks it equals the model.
fn compare(fs: &MemFs, m: &Model, seed: u64, step: usize) {
    let mut seen = BTreeMap::new();
    let mut stack = vec![(Vec::<String>::new(), ROOT)];
    while let Some((path, ino)) = stack.pop() {
        for (name, child, _) in list(fs, ino, 7) {
            let mut p = path.clone();
            p.push(name);
            let st = getattr(fs, child);
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                seen.insert(p.clone(), M::Dir);
                stack.push((p, child));
            } else {
                seen.insert(p, M::File(contents(fs, child)));
            }
        }
    }
    let want: BTreeMap<Vec<String>, M> =
        m.0.iter()
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.iter().map(|s| s.to_string()).collect(), v.clone()))
            .collect();
    assert_eq!(
        seen.len(),
        want.len(),
        "seed {seed} step {step}: entry count"
    );
    for (k, v) in &want {
        assert_eq!(seen.get(k), Some(v), "seed {seed} step {step}: {k:?}");
    }
}
