//! A real Glance: sqlite database, file store, `flavor = keystone` (tokens checked by the
//! given Keystone, where it registers itself), served by gunicorn.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{emulator, free_port, run, venv_file, work_dir, Keystone, Server, REGION};

/// A running Glance on 127.0.0.1.
pub struct Glance {
    /// The port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:PORT`, also its image endpoint in Keystone.
    pub url: String,
    _server: Server,
    dir: tempfile::TempDir,
}

impl Glance {
    /// Registers the service user `glance` (admin on project `service`) and the image
    /// service with public, internal and admin endpoints in `ks`, then configures and
    /// starts Glance and waits until it answers. `None` when skipped (see [`emulator`]).
    pub async fn start(ks: &Keystone) -> Option<Glance> {
        let manage = emulator("venv-glance", "glance-manage")?;
        let gunicorn = emulator("venv-glance", "gunicorn")?;
        let paste = venv_file("venv-glance", Path::new("etc/glance/glance-api-paste.ini"))?;
        let dir = work_dir("glance");
        let d = dir.path();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");

        ks.add_project_user("service", "glance", "glance", "admin")
            .await;
        ks.add_service("image", "glance", &url, &["public", "internal", "admin"])
            .await;

        let etc = d.join("etc");
        fs::create_dir_all(&etc).expect("create etc");
        fs::copy(&paste, etc.join("glance-api-paste.ini")).expect("copy glance-api-paste.ini");
        let ks_root = format!("http://127.0.0.1:{}", ks.port);
        let conf = etc.join("glance-api.conf");
        fs::write(
            &conf,
            format!(
                "[DEFAULT]\n\
                 bind_host = 127.0.0.1\nbind_port = {port}\nworkers = 0\n\
                 enabled_backends = fs:file\n\
                 image_cache_dir = {d}/cache\n\
                 [database]\nconnection = sqlite:///{d}/glance.sqlite\n\
                 [paste_deploy]\nflavor = keystone\nconfig_file = {etc}/glance-api-paste.ini\n\
                 [glance_store]\ndefault_backend = fs\n\
                 [fs]\nfilesystem_store_datadir = {d}/images\n\
                 [os_glance_staging_store]\nfilesystem_store_datadir = {d}/staging\n\
                 [os_glance_tasks_store]\nfilesystem_store_datadir = {d}/tasks\n\
                 [oslo_policy]\nenforce_new_defaults = false\nenforce_scope = false\n\
                 [keystone_authtoken]\n\
                 www_authenticate_uri = {ks_root}\nauth_url = {ks_root}\nauth_type = password\n\
                 project_domain_name = Default\nuser_domain_name = Default\n\
                 project_name = service\nusername = glance\npassword = glance\n\
                 region_name = {REGION}\n",
                d = d.display(),
                etc = etc.display(),
            ),
        )
        .expect("write glance-api.conf");
        run(
            Command::new(&manage).args([
                "--config-file",
                conf.to_str().expect("UTF-8 temp path"),
                "db_sync",
            ]),
            "glance-manage db_sync",
        );
        let mut cmd = Command::new(gunicorn);
        cmd.args([
            "-b",
            &format!("127.0.0.1:{port}"),
            "-w",
            "1",
            "--timeout",
            "300",
            "glance.wsgi.api:application",
        ])
        .current_dir(d)
        .env("OS_GLANCE_CONFIG_DIR", &etc);
        let mut server = Server::spawn("glance (gunicorn)", cmd, d.join("glance.log"));
        server
            .wait_http(&format!("{url}/versions"), Duration::from_secs(90))
            .await;
        Some(Glance {
            port,
            url,
            _server: server,
            dir,
        })
    }

    /// The temp dir with the configuration, database, image store and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
