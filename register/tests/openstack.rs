//! OpenStack registration against a real Keystone and a real Glance, both started
//! by the test on 127.0.0.1.

mod common;

use common::*;
use md5::Md5;
use register::openstack::{AuthConfig, AuthMethod};
use register::{NoProgress, OpenStackOptions, RegisterError};
use serde_json::{json, Value};
use sha2::{Digest, Sha512};

const MIB: u64 = 1 << 20;

async fn glance_get(token: &str, url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .header("X-Auth-Token", token)
        .send()
        .await
        .expect("Glance GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glance_upload_is_active_and_hashes_match() {
    let Some(ks) = Keystone::start().await else {
        return;
    };
    let Some(glance) = Glance::start(&ks).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("disk.img");
    let data = make_image(&path, 6 * MIB + 7, &[(0, 300_000), (4 * MIB, 70_000)]);
    let build_id = uuid::Uuid::new_v4().to_string();
    let mut info = image_info(&path, "mkimage-glance-test", &build_id);
    info.md5 = Some(hex::encode(Md5::digest(&data)));
    info.sha256 = Some(hex::encode(sha2::Sha256::digest(&data)));

    // Password auth from a clouds.yaml.
    let clouds = ks.write_clouds_yaml(tmp.path());
    let opts = OpenStackOptions {
        cloud: Some("test".into()),
        clouds_file: Some(clouds),
        ..OpenStackOptions::default()
    };
    let reg = register::register_openstack(&info, &opts, &NoProgress)
        .await
        .expect("register_openstack");

    assert_eq!(reg.status, "active");
    assert!(!reg.existing);
    assert_eq!(reg.endpoint, glance.url);
    assert_eq!(reg.size, data.len() as u64);
    assert_eq!(
        reg.checksum.as_deref(),
        Some(hex::encode(Md5::digest(&data)).as_str())
    );
    assert_eq!(reg.os_hash_algo.as_deref(), Some("sha512"));
    assert_eq!(
        reg.os_hash_value.as_deref(),
        Some(hex::encode(Sha512::digest(&data)).as_str())
    );

    // What Glance holds: properties, and the very bytes.
    let token = ks.admin_token().await;
    let img: Value = glance_get(
        &token,
        &format!("{}/v2/images/{}", glance.url, reg.image_id),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(img["status"], "active");
    assert_eq!(img["disk_format"], "raw");
    assert_eq!(img["container_format"], "bare");
    assert_eq!(img["hw_disk_bus"], "virtio");
    assert_eq!(img["os_distro"], "debian");
    assert_eq!(img["architecture"], "x86_64");
    assert_eq!(img["mkimage_build_id"], build_id.as_str());
    let file = glance_get(
        &token,
        &format!("{}/v2/images/{}/file", glance.url, reg.image_id),
    )
    .await
    .bytes()
    .await
    .unwrap();
    assert!(
        file.as_ref() == data.as_slice(),
        "Glance serves the bytes we uploaded"
    );

    // Same name again: reported, not duplicated.
    let again = register::register_openstack(&info, &opts, &NoProgress)
        .await
        .expect("second registration");
    assert!(again.existing);
    assert_eq!(again.image_id, reg.image_id);

    // replace: a new verified image, then the old one is deleted.
    let replaced = register::register_openstack(
        &info,
        &OpenStackOptions {
            replace: true,
            ..opts.clone()
        },
        &NoProgress,
    )
    .await
    .expect("replace");
    assert!(!replaced.existing);
    assert_ne!(replaced.image_id, reg.image_id);
    assert_eq!(replaced.replaced, vec![reg.image_id.clone()]);
    assert_eq!(replaced.os_hash_value, reg.os_hash_value);
    let old = glance_get(
        &token,
        &format!("{}/v2/images/{}", glance.url, reg.image_id),
    )
    .await;
    assert_eq!(old.status().as_u16(), 404, "the replaced image is gone");
    let reg = replaced;

    // Application-credential auth (explicit config, as from OS_APPLICATION_CREDENTIAL_*).
    let (_, tok_body) = ks.token_for("admin", ADMIN_PASSWORD, "admin").await;
    let user_id = tok_body["token"]["user"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ac = ks
        .api(
            reqwest::Method::POST,
            &format!("/users/{user_id}/application_credentials"),
            Some(json!({"application_credential": {"name": "mkimage-test"}})),
        )
        .await;
    let env: std::collections::HashMap<String, String> = [
        ("OS_AUTH_URL", ks.auth_url.clone()),
        (
            "OS_APPLICATION_CREDENTIAL_ID",
            ac["application_credential"]["id"]
                .as_str()
                .unwrap()
                .to_string(),
        ),
        (
            "OS_APPLICATION_CREDENTIAL_SECRET",
            ac["application_credential"]["secret"]
                .as_str()
                .unwrap()
                .to_string(),
        ),
        ("OS_REGION_NAME", REGION.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let auth = AuthConfig::from_env_map(&env).unwrap();
    assert!(matches!(
        auth.method,
        AuthMethod::ApplicationCredential { .. }
    ));
    let info2 = register::ImageInfo {
        name: "mkimage-glance-appcred".into(),
        ..info.clone()
    };
    let reg2 = register::register_openstack(
        &info2,
        &OpenStackOptions {
            auth: Some(auth),
            ..OpenStackOptions::default()
        },
        &NoProgress,
    )
    .await
    .expect("register with an application credential");
    assert_eq!(reg2.status, "active");
    assert_eq!(reg2.checksum, reg.checksum);
    assert_ne!(reg2.image_id, reg.image_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_upload_is_detected_and_the_image_deleted() {
    let Some(ks) = Keystone::start().await else {
        return;
    };
    let Some(glance) = Glance::start(&ks).await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("disk.img");
    make_image(&path, 3 * MIB, &[(0, 2 * MIB as usize)]);
    let info = image_info(&path, "mkimage-corrupt", "build-corrupt");
    let opts = OpenStackOptions {
        auth: Some(
            AuthConfig::from_clouds_yaml(&ks.write_clouds_yaml(tmp.path()), "test").unwrap(),
        ),
        corrupt_upload: true,
        ..OpenStackOptions::default()
    };
    let err = register::register_openstack(&info, &opts, &NoProgress)
        .await
        .expect_err("a corrupted upload must fail");
    match err.root() {
        RegisterError::Integrity { what, .. } => assert!(what.contains("Glance"), "{err}"),
        e => panic!("expected an integrity error, got {e}"),
    }
    let id = match &err {
        RegisterError::CleanedUp {
            cleaned_up,
            left_behind,
            ..
        } => {
            assert!(left_behind.is_empty(), "{err}");
            assert_eq!(cleaned_up.len(), 1, "{err}");
            cleaned_up[0]
                .trim_start_matches("Glance image ")
                .to_string()
        }
        e => panic!("expected CleanedUp, got {e}"),
    };
    let token = ks.admin_token().await;
    let r = glance_get(&token, &format!("{}/v2/images/{id}", glance.url)).await;
    assert_eq!(r.status().as_u16(), 404, "the corrupted image was deleted");
    let list: Value = glance_get(
        &token,
        &format!("{}/v2/images?name=mkimage-corrupt", glance.url),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(list["images"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_auth_error() {
    let Some(ks) = Keystone::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("disk.img");
    make_image(&path, MIB, &[(0, 1000)]);
    let mut auth = AuthConfig::from_clouds_yaml(&ks.write_clouds_yaml(tmp.path()), "test").unwrap();
    if let AuthMethod::Password { password, .. } = &mut auth.method {
        *password = "wrong".into();
    }
    let err = register::register_openstack(
        &image_info(&path, "x", "b"),
        &OpenStackOptions {
            auth: Some(auth),
            ..OpenStackOptions::default()
        },
        &NoProgress,
    )
    .await
    .expect_err("wrong password");
    assert!(matches!(err, RegisterError::Auth { .. }), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
}
