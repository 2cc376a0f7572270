//! Certificates made at test time (rcgen): a private CA and server certificates it signs,
//! written as PEM files for the servers' configuration.
//!
//! Included with `#[path = "support/tls.rs"] mod tls;` (beside `mod servers` for the
//! servers).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A private certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM): the root clients trust.
    pub pem: String,
}

/// A server certificate and its key, as PEM files.
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tokenkeeper test CA");
        let cert = params.self_signed(&key).expect("the CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), signed by this CA, written
    /// to `dir` as `<stem>.crt` and `<stem>.key` (mode 0600, as PostgreSQL requires).
    pub fn server(&self, names: &[&str], dir: &Path, stem: &str) -> ServerFiles {
        let key = KeyPair::generate().expect("a server key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("server params");
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a server certificate");
        let files = ServerFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600))
                .expect("key mode");
        }
        files
    }

    /// The CA's certificate written to `dir/ca.crt`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.crt");
        std::fs::write(&path, &self.pem).expect("write the CA certificate");
        path
    }
}

/// A `redis-server` that also listens with TLS, its certificate (for `names`) signed by
/// a private CA made at test time. Needs `mod servers` (support/servers.rs) beside `mod tls`.
pub struct TlsRedis {
    pub server: super::servers::RedisServer,
    tls_port: u16,
    certs: tempfile::TempDir,
    pub ca: TestCa,
}

impl TlsRedis {
    pub fn start(names: &[&str]) -> Self {
        let certs = tempfile::tempdir().expect("a temp dir for certificates");
        let ca = TestCa::new();
        let files = ca.server(names, certs.path(), "redis");
        let ca_path = ca.write(certs.path());
        let tls_port = super::servers::free_port();
        let port = tls_port.to_string();
        let server = super::servers::RedisServer::start_with_args(&[
            "--tls-port",
            &port,
            "--tls-cert-file",
            files.cert.to_str().expect("utf-8 path"),
            "--tls-key-file",
            files.key.to_str().expect("utf-8 path"),
            "--tls-ca-cert-file",
            ca_path.to_str().expect("utf-8 path"),
            "--tls-auth-clients",
            "no",
        ]);
        Self {
            server,
            tls_port,
            certs,
            ca,
        }
    }

    /// `rediss://localhost:<tls port>/0`.
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}/0", self.tls_port)
    }

    /// The CA's certificate file.
    pub fn ca_path(&self) -> std::path::PathBuf {
        self.certs.path().join("ca.crt")
    }
}

/// A PostgreSQL server with TLS on, its certificate (for `names`) signed by a private CA
/// made at test time. Needs `mod servers` beside `mod tls`.
pub struct TlsPostgres {
    pub server: super::servers::PostgresServer,
    certs: tempfile::TempDir,
    pub ca: TestCa,
}

impl TlsPostgres {
    pub fn start(names: &[&str]) -> Self {
        let certs = tempfile::tempdir().expect("a temp dir for certificates");
        let ca = TestCa::new();
        let files = ca.server(names, certs.path(), "postgres");
        ca.write(certs.path());
        let mut server = super::servers::PostgresServer::start();
        server.enable_tls(&files.cert, &files.key);
        Self { server, certs, ca }
    }

    /// A URL to `localhost` with `sslmode` and the CA as `sslrootcert`.
    pub fn url(&self, sslmode: &str) -> String {
        format!(
            "postgresql://postgres@localhost:{}/postgres?sslmode={sslmode}&sslrootcert={}",
            self.server.port(),
            self.ca_path().display()
        )
    }

    /// The CA's certificate file.
    pub fn ca_path(&self) -> std::path::PathBuf {
        self.certs.path().join("ca.crt")
    }
}
