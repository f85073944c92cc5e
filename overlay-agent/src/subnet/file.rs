//! The subnet file (`--subnet-file`, default `/run/flannel/subnet.env`), flannel-compat.md §3.
//!
//! Docker and the CNI flannel plugin read it, so it is written exactly as flanneld writes it:
//!
//! ```text
//! FLANNEL_NETWORK=172.16.0.0/16
//! FLANNEL_SUBNET=172.16.57.1/24
//! FLANNEL_MTU=1450
//! FLANNEL_IPMASQ=true
//! ```
//!
//! It is replaced atomically (a temporary file in the same directory, then `rename`), so a
//! reader never sees half a file. On start its `FLANNEL_SUBNET` is the fallback subnet to ask
//! for when etcd holds no lease for our public IP.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use tracing::warn;

/// flanneld's default `--subnet-file`.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// What the subnet file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The cluster network (`FLANNEL_NETWORK`).
    pub network: Ipv4Net,
    /// This node's lease; written as its first usable address (`FLANNEL_SUBNET=…1/24`).
    pub subnet: Ipv4Net,
    /// `FLANNEL_MTU`: see [`crate::subnet::config::Backend::pod_mtu`].
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether the agent masquerades, so Docker must not (`--ip-masq=false`).
    pub ip_masq: bool,
}

/// Why the subnet file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SubnetFileError {
    #[error("cannot create directory {path} for the subnet file: {source}", path = path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}", path = path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {from} to {to}: {source}", from = from.display(), to = to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}", path = path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid {key} in {path}: {value:?}", path = path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        value: String,
    },
    #[error("{path} has no usable file name", path = path.display())]
    BadPath { path: PathBuf },
    #[error("{path} is a directory, not a file", path = path.display())]
    IsADirectory { path: PathBuf },
    #[error(
        "{path} is not a subnet file ({what}): the agent replaces the whole file, so it would \
         be lost; point --subnet-file elsewhere (default {DEFAULT_SUBNET_FILE}), or remove the \
         file if it is a stale one of ours",
        path = path.display()
    )]
    NotASubnetFile { path: PathBuf, what: String },
}

impl SubnetEnv {
    /// The file's text, in flannel's key order.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first_usable(self.subnet),
            self.mtu,
            self.ip_masq
        )
    }
}

/// The first host address of `subnet` with its prefix length: `172.16.57.0/24` gives
/// `172.16.57.1/24`, the address Docker's `--bip` and the CNI bridge put on the bridge.
pub fn first_usable(subnet: Ipv4Net) -> Ipv4Net {
    let addr = Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1));
    Ipv4Net::new(addr, subnet.prefix_len()).unwrap_or(subnet)
}

/// Writes the subnet file atomically with mode 0644, creating its directory (0755) if needed.
pub fn write_subnet_file(path: &Path, env: &SubnetEnv) -> Result<(), SubnetFileError> {
    let (dir, temp) = prepare(path)?;
    let result = write_temp(&temp, env.render().as_bytes());
    if let Err(source) = result {
        let _ = fs::remove_file(&temp);
        return Err(SubnetFileError::Write { path: temp, source });
    }
    if let Err(source) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(SubnetFileError::Rename {
            from: temp,
            to: path.to_owned(),
            source,
        });
    }
    // Make the rename itself durable; failing to is not worth failing the write for.
    if let Ok(dir) = File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Checks that the subnet file can be written at `path`, the way [`write_subnet_file`] writes
/// it (directory created, a temporary file beside it, then renamed over a file that is no
/// directory), without writing it: the agent calls this before it leases a subnet or installs
/// anything, so a location it cannot write stops it before there is anything to undo.
///
/// A file already there must be a subnet file (only `FLANNEL_*` variables, comments and blank
/// lines, as flanneld and we write it): a `--subnet-file` pointing at another program's file
/// (`/etc/resolv.conf`, mk-docker-opts.sh's `/run/flannel/docker`) would be replaced whole.
pub fn check_writable(path: &Path) -> Result<(), SubnetFileError> {
    let (_, temp) = prepare(path)?;
    if path.is_dir() {
        return Err(SubnetFileError::IsADirectory {
            path: path.to_owned(),
        });
    }
    check_ours(path)?;
    let result = write_temp(&temp, b"");
    let _ = fs::remove_file(&temp);
    result.map_err(|source| SubnetFileError::Write { path: temp, source })
}

/// Whether the file at `path`, if any, is a subnet file: every line blank, a comment, or a
/// `FLANNEL_*` variable (`export` and quotes allowed, as [`parse_subnet_env`] reads them).
fn check_ours(path: &Path) -> Result<(), SubnetFileError> {
    let not_ours = |what: String| SubnetFileError::NotASubnetFile {
        path: path.to_owned(),
        what,
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SubnetFileError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let text = String::from_utf8(bytes).map_err(|_| not_ours("not text".to_owned()))?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let ours = line.is_empty()
            || line.starts_with('#')
            || line
                .split_once('=')
                .is_some_and(|(key, _)| key.trim().starts_with("FLANNEL_"));
        if !ours {
            let shown = crate::subnet::registry::cut_for_log(line);
            return Err(not_ours(format!("line {}: {shown:?}", n + 1)));
        }
    }
    Ok(())
}

/// Creates the subnet file's directory; returns it and the temporary file to write first
/// (same directory, so the rename is atomic; the pid keeps two agents from sharing it).
fn prepare(path: &Path) -> Result<(PathBuf, PathBuf), SubnetFileError> {
    let name =
        path.file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| SubnetFileError::BadPath {
                path: path.to_owned(),
            })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(&dir)
        .map_err(|source| SubnetFileError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    Ok((dir, temp))
}

fn write_temp(temp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(temp)?;
    // The umask may have narrowed the mode at creation; flannel ignores the umask too.
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The values found in a subnet file; each is `None` when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetFileContents {
    pub network: Option<Ipv4Net>,
    /// The lease, host bits of `FLANNEL_SUBNET` cleared (`172.16.57.1/24` → `172.16.57.0/24`).
    pub subnet: Option<Ipv4Net>,
    pub mtu: Option<u32>,
    pub ip_masq: Option<bool>,
    /// Every `KEY=value` line, unquoted.
    pub vars: BTreeMap<String, String>,
}

/// Parses the text of a subnet file, tolerating what dotenv readers do: blank lines,
/// `#` comments, `export ` prefixes, quoted values. Unknown keys are kept in `vars`.
pub fn parse_subnet_env(path: &Path, text: &str) -> Result<SubnetFileContents, SubnetFileError> {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        vars.insert(key.trim().to_owned(), value.to_owned());
    }

    let invalid = |key: &str, value: &str| SubnetFileError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
    };
    let cidr = |key: &str| -> Result<Option<Ipv4Net>, SubnetFileError> {
        vars.get(key)
            .map(|v| {
                v.parse::<Ipv4Net>()
                    .map(|net| net.trunc())
                    .map_err(|_| invalid(key, v))
            })
            .transpose()
    };
    let network = cidr("FLANNEL_NETWORK")?;
    let subnet = cidr("FLANNEL_SUBNET")?;
    let mtu = vars
        .get("FLANNEL_MTU")
        .map(|v| v.parse::<u32>().map_err(|_| invalid("FLANNEL_MTU", v)))
        .transpose()?;
    let ip_masq = vars
        .get("FLANNEL_IPMASQ")
        .map(|v| v.parse::<bool>().map_err(|_| invalid("FLANNEL_IPMASQ", v)))
        .transpose()?;
    Ok(SubnetFileContents {
        network,
        subnet,
        mtu,
        ip_masq,
        vars,
    })
}

/// Reads the subnet file; `Ok(None)` when it does not exist (first start on this node).
pub fn read_subnet_file(path: &Path) -> Result<Option<SubnetFileContents>, SubnetFileError> {
    match fs::read_to_string(path) {
        Ok(text) => parse_subnet_env(path, &text).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SubnetFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The subnet this node had before, from the subnet file, for the lease fallback. Problems
/// are logged and yield `None`, as in flanneld: a bad file must not stop the node.
pub fn previous_subnet(path: &Path) -> Option<Ipv4Net> {
    match read_subnet_file(path) {
        Ok(Some(contents)) => {
            if contents.subnet.is_none() {
                warn!(
                    "no subnet found for key: FLANNEL_SUBNET in file: {}",
                    path.display()
                );
            }
            contents.subnet
        }
        Ok(None) => None,
        Err(e) => {
            warn!("Couldn't fetch previous FLANNEL_SUBNET from subnet file: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: net("172.16.0.0/16"),
            subnet: net("172.16.57.0/24"),
            mtu: 1450,
            ip_masq: true,
        }
    }

    #[test]
    fn renders_flannels_exact_text() {
        assert_eq!(
            env().render(),
            "FLANNEL_NETWORK=172.16.0.0/16\nFLANNEL_SUBNET=172.16.57.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let host_gw = SubnetEnv {
            network: net("172.7.0.0/16"),
            subnet: net("172.7.3.64/26"),
            mtu: 1500,
            ip_masq: false,
        };
        assert_eq!(
            host_gw.render(),
            "FLANNEL_NETWORK=172.7.0.0/16\nFLANNEL_SUBNET=172.7.3.65/26\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn first_usable_address() {
        assert_eq!(first_usable(net("10.0.0.0/24")), net("10.0.0.1/24"));
        assert_eq!(first_usable(net("10.0.0.4/30")), net("10.0.0.5/30"));
        assert_eq!(first_usable(net("10.0.0.5/24")), net("10.0.0.1/24"));
    }

    #[test]
    fn write_creates_directory_mode_and_content_then_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        write_subnet_file(&path, &env()).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), env().render());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["subnet.env"]);

        let contents = read_subnet_file(&path).unwrap().unwrap();
        assert_eq!(contents.network, Some(net("172.16.0.0/16")));
        assert_eq!(contents.subnet, Some(net("172.16.57.0/24")));
        assert_eq!(contents.mtu, Some(1450));
        assert_eq!(contents.ip_masq, Some(true));
        assert_eq!(previous_subnet(&path), Some(net("172.16.57.0/24")));
    }

    #[test]
    fn rewrite_replaces_and_fixes_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        fs::write(&path, "junk").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        write_subnet_file(&path, &env()).unwrap();
        let changed = SubnetEnv {
            subnet: net("172.16.9.0/24"),
            ..env()
        };
        write_subnet_file(&path, &changed).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), changed.render());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn missing_file_is_no_previous_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.env");
        assert_eq!(read_subnet_file(&path).unwrap(), None);
        assert_eq!(previous_subnet(&path), None);
    }

    #[test]
    fn tolerant_parsing() {
        let text = "# written by hand\n\nexport FLANNEL_NETWORK=\"10.1.0.0/16\"\nFLANNEL_SUBNET = '10.1.7.1/24'\nFLANNEL_IPV6_NETWORK=fd00::/56\nnot a pair\n";
        let contents = parse_subnet_env(Path::new("x"), text).unwrap();
        assert_eq!(contents.network, Some(net("10.1.0.0/16")));
        assert_eq!(contents.subnet, Some(net("10.1.7.0/24")));
        assert_eq!(contents.mtu, None);
        assert_eq!(contents.ip_masq, None);
        assert_eq!(contents.vars["FLANNEL_IPV6_NETWORK"], "fd00::/56");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = parse_subnet_env(
            Path::new("/run/flannel/subnet.env"),
            "FLANNEL_SUBNET=10.1.7.1\n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid FLANNEL_SUBNET in /run/flannel/subnet.env: \"10.1.7.1\""
        );
        let err = parse_subnet_env(Path::new("f"), "FLANNEL_MTU=big\n").unwrap_err();
        assert!(err.to_string().contains("FLANNEL_MTU"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        fs::write(&path, "FLANNEL_SUBNET=nonsense\n").unwrap();
        assert_eq!(previous_subnet(&path), None);
    }

    #[test]
    fn check_writable_finds_what_the_write_would_fail_on_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        check_writable(&path).unwrap();
        assert!(!path.exists(), "the check writes no subnet file");
        let left: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert!(left.is_empty(), "no temporary file left: {left:?}");
        write_subnet_file(&path, &env()).unwrap();
        check_writable(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            env().render(),
            "untouched"
        );

        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = check_writable(&blocker.join("subnet.env")).unwrap_err();
        assert!(matches!(err, SubnetFileError::CreateDir { .. }), "{err}");
        let err = check_writable(dir.path()).unwrap_err();
        assert!(matches!(err, SubnetFileError::IsADirectory { .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn another_programs_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        // flanneld's file with IPv6 keys, a comment and `export`: ours.
        let flanneld = "# written by flanneld\nFLANNEL_NETWORK=10.1.0.0/16\n\
                        FLANNEL_IPV6_NETWORK=fd00::/48\nexport FLANNEL_SUBNET=\"10.1.5.1/24\"\n";
        fs::write(&path, flanneld).unwrap();
        check_writable(&path).unwrap();
        fs::write(&path, "").unwrap();
        check_writable(&path).unwrap();

        for (text, what) in [
            ("nameserver 10.0.0.2\n", "line 1: \"nameserver 10.0.0.2\""),
            (
                "FLANNEL_SUBNET=10.1.5.1/24\nDOCKER_OPT_BIP=\"--bip=10.1.5.1/24\"\n",
                "line 2: \"DOCKER_OPT_BIP=",
            ),
        ] {
            fs::write(&path, text).unwrap();
            let err = check_writable(&path).unwrap_err().to_string();
            assert!(
                err.contains(&path.display().to_string())
                    && err.contains("is not a subnet file")
                    && err.contains(what),
                "{err}"
            );
            assert_eq!(fs::read_to_string(&path).unwrap(), text, "left alone");
        }
        fs::write(&path, [0xff, 0xfe, 0]).unwrap();
        let err = check_writable(&path).unwrap_err().to_string();
        assert!(err.contains("(not text)"), "{err}");
    }

    #[test]
    fn unwritable_location_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = write_subnet_file(&blocker.join("subnet.env"), &env()).unwrap_err();
        assert!(matches!(err, SubnetFileError::CreateDir { .. }), "{err}");
        let err = write_subnet_file(Path::new("/"), &env()).unwrap_err();
        assert!(matches!(err, SubnetFileError::BadPath { .. }), "{err}");
    }
}
