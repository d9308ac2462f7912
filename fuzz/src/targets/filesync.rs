//! `filesync`: the fsutil DiffCopy receiver (`kiln_session::filesync::receive`),
//! which writes a client's context into kilnd and a local export into the
//! client, fed packets from a peer that may say anything.
//!
//! The bytes are a text script, one packet a line (so the corpus is readable
//! and paths mutate well):
//!
//! ```text
//! S d PATH [k=v …]          STAT of a directory
//! S f PATH [k=v …]          STAT of a regular file
//! S l PATH TARGET [k=v …]   STAT of a symlink
//! S h PATH LINKNAME [k=v …] STAT of a hard link
//! S p PATH | S c PATH       STAT of a fifo | char device
//! S x MODE PATH [LINK]      STAT with raw Go FileMode bits (decimal)
//! S                         the empty STAT that ends the file list
//! D ID [BYTES]              DATA for file ID (no bytes: the file's end)
//! F | E MSG | R ID | Q TYPE FIN | ERR | REQ (not the sender's) | a raw packet type
//! ---                       the stream ends; the next lines are a new sync
//! ```
//!
//! `k=v`: `m=` permission bits (octal), `u=`/`g=` owner, `s=` size, `t=` mtime (ns).
//! Each sync runs over what the previous one left, starting from a root
//! that holds symlinks out of it ([`crate::sandbox`]); nothing outside the
//! root may change.

use std::cell::RefCell;
use std::collections::VecDeque;

use kiln_proto::fsutil::types::{Packet, Stat, packet::PacketType};
use kiln_session::filesync::{PacketConn, gomode, receive};

use crate::Target;
use crate::sandbox::Sandbox;

pub fn target() -> Target {
    Target {
        name: "filesync",
        about: "the fsutil receiver (kiln_session::filesync::receive) fed STAT/REQ/DATA/FIN/ERR packets into a temp root, nothing outside it may change",
        run,
        seeds,
        tokens: TOKENS,
        mutate: None,
        max_len: 16 * 1024,
    }
}

const TOKENS: &[&[u8]] = &[
    b"\n",
    b" ",
    b"S d ",
    b"S f ",
    b"S l ",
    b"S h ",
    b"S p ",
    b"S c ",
    b"S x ",
    b"\nS\n",
    b"S\n",
    b"D 0 data\n",
    b"D 0\n",
    b"D 1 x\n",
    b"D 1\n",
    b"D 4294967295\n",
    b"F\n",
    b"E boom\n",
    b"R 0\n",
    b"Q 9\n",
    b"---\n",
    b" m=777",
    b" m=4755",
    b" m=0",
    b" u=1000",
    b" g=1000",
    b" s=5",
    b" s=-1",
    b" t=0",
    b" t=-1",
    b" t=9223372036854775807",
    b"2147483648",
    b"134217728",
    b".kiln-recv-",
    b".kiln-recv-a",
    b"a",
    b"a/b",
    b"//",
    b"./a",
    b"a/",
    b"../",
    b"..",
    b"/",
    b"../sibling",
    b"../sibling/victim",
    b"/tmp/kiln-fuzz-outside",
    b"/tmp/kiln-fuzz-outside/victim",
    b"link",
    b"link/victim",
    b"abs",
    b"abs/victim",
    b"abs/dir",
    b"victim",
    b"rel_victim",
    b"dir",
    b"dir/file",
    b"dir/up",
    b"dir/up/sibling",
    b"loop",
];

const SEEDS: &[&str] = &[
    // a normal context
    "S d dir m=755\nS f dir/a s=5\nS l dir/l a\nS h dir/h dir/a\nS f top s=3\nS\nD 1 hello\nD 1\nD 4 abc\nD 4\nF\n",
    // a second sync that changes types under the same names
    "S d a\nS f a/b s=1\nS\nD 1 x\nD 1\nF\n---\nS l a ../sibling\nS f b s=1\nS\nD 1 y\nD 1\nF\n",
    // write through a symlink that arrived in the same list
    "S l a /tmp/kiln-fuzz-outside\nS f a/victim s=3\nS\nD 1 pwn\nD 1\nF\n",
    "S l a ../sibling\nS d a/dir\nS\nF\n",
    // write through the root's own symlinks
    "S f link/victim s=3\nS\nD 0 pwn\nD 0\nF\n",
    "S d abs/dir m=777\nS\nF\n",
    // hard links out of the root
    "S f x s=0\nS h y ../sibling/victim\nS h z victim\nS h w abs/victim\nS\nD 0\nF\n",
    // a dir's metadata set through a symlink of the same name
    "S d a m=777\nS l a /tmp/kiln-fuzz-outside\nS\nF\n",
    "S d a m=777 u=1000\nS l a ../sibling/victim\nS\nF\n",
    "S d victim m=700\nS\nF\n",
    // the temporary file's name taken by a symlink
    "S l .kiln-recv-f /tmp/kiln-fuzz-outside/victim\nS f f s=3\nS\nD 1 pwn\nD 1\nF\n",
    // protocol abuse
    "S f a\nS\nD 7 x\n",
    "S f a\nS\nD 0 x\nD 0 y\nF\n",
    "S f a\nS f a\nS\nD 0 x\nD 0\nD 1 y\nD 1\nF\n",
    "R 0\nS\n",
    "E boom\n",
    "S x 2147483648 d\nS x 134217728 l /\nS x 0 ../x\nS\nF\n",
    "S d .\nS d ./a\nS f /abs\nS f a/../../x\nS\nF\n",
];

fn seeds() -> Vec<Vec<u8>> {
    SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// One sync's packets, parsed from the script.
fn parse(script: &str) -> Vec<VecDeque<Packet>> {
    let mut syncs = vec![VecDeque::new()];
    for line in script.split('\n') {
        if line == "---" {
            syncs.push(VecDeque::new());
            continue;
        }
        let mut words = line.splitn(3, ' ');
        let op = words.next().unwrap_or("");
        let p = match op {
            "S" => {
                let rest: Vec<&str> = line.split(' ').skip(1).collect();
                Packet {
                    r#type: PacketType::PacketStat as i32,
                    stat: stat(&rest),
                    ..Default::default()
                }
            }
            "D" => {
                let id = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                Packet {
                    r#type: PacketType::PacketData as i32,
                    id,
                    data: words.next().unwrap_or("").as_bytes().to_vec(),
                    ..Default::default()
                }
            }
            "F" => Packet {
                r#type: PacketType::PacketFin as i32,
                ..Default::default()
            },
            "E" => Packet {
                r#type: PacketType::PacketErr as i32,
                data: line.get(2..).unwrap_or("").as_bytes().to_vec(),
                ..Default::default()
            },
            "R" => Packet {
                r#type: PacketType::PacketReq as i32,
                id: words.next().and_then(|w| w.parse().ok()).unwrap_or(0),
                ..Default::default()
            },
            "Q" => Packet {
                r#type: words.next().and_then(|w| w.parse().ok()).unwrap_or(0),
                ..Default::default()
            },
            _ => continue,
        };
        syncs.last_mut().expect("one sync").push_back(p);
    }
    syncs
}

fn stat(words: &[&str]) -> Option<Stat> {
    let kind = *words.first()?;
    let mut st = Stat::default();
    let mut rest = &words[1..];
    let take = |rest: &mut &[&str]| -> String {
        let w = rest.first().copied().unwrap_or("").to_string();
        if !rest.is_empty() {
            *rest = &rest[1..];
        }
        w
    };
    match kind {
        "d" => {
            st.mode = gomode::DIR | 0o755;
            st.path = take(&mut rest);
        }
        "f" => {
            st.mode = 0o644;
            st.path = take(&mut rest);
        }
        "l" => {
            st.mode = gomode::SYMLINK | 0o777;
            st.path = take(&mut rest);
            st.linkname = take(&mut rest);
        }
        "h" => {
            st.mode = 0o644;
            st.path = take(&mut rest);
            st.linkname = take(&mut rest);
        }
        "p" => {
            st.mode = gomode::NAMED_PIPE | 0o644;
            st.path = take(&mut rest);
        }
        "c" => {
            st.mode = gomode::DEVICE | gomode::CHAR_DEVICE | 0o644;
            st.path = take(&mut rest);
        }
        "x" => {
            st.mode = take(&mut rest).parse().unwrap_or(0);
            st.path = take(&mut rest);
            if rest.first().is_some_and(|w| !w.contains('=')) {
                st.linkname = take(&mut rest);
            }
        }
        _ => st.path = kind.to_string(),
    }
    for kv in rest {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        match k {
            "m" => {
                let perm = u32::from_str_radix(v, 8).unwrap_or(0);
                st.mode = (st.mode & gomode::TYPE) | gomode::from_unix(perm & 0o7777);
            }
            "u" => st.uid = v.parse().unwrap_or(0),
            "g" => st.gid = v.parse().unwrap_or(0),
            "s" => st.size = v.parse().unwrap_or(0),
            "t" => st.mod_time = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Some(st)
}

/// A peer that says what the script says and hears nothing.
struct Script(VecDeque<Packet>);

impl PacketConn for Script {
    async fn send(&mut self, _p: Packet) -> Result<(), kiln_session::Error> {
        Ok(())
    }
    async fn recv(&mut self) -> Result<Option<Packet>, kiln_session::Error> {
        Ok(self.0.pop_front())
    }
}

thread_local! {
    static SANDBOX: RefCell<Option<Sandbox>> = const { RefCell::new(None) };
}

pub fn run(data: &[u8]) {
    let script = String::from_utf8_lossy(data);
    let syncs = parse(&script);
    SANDBOX.with(|s| {
        let mut s = s.borrow_mut();
        let sb = s.get_or_insert_with(|| Sandbox::new("filesync", &[]));
        sb.reset();
        sb.populate_base();
        crate::rt::block_on(async {
            for packets in syncs {
                let mut conn = Script(packets);
                let _ = receive(&mut conn, &sb.root).await;
                sb.check();
            }
        });
    });
}
