//! OVA appliances: the disk as a streamOptimized VMDK, an OVF 1.0 descriptor that
//! says what virtual machine to make for it, and a manifest of SHA-256 digests, in
//! one ustar archive. VirtualBox (and VMware) import such a file in one step, where
//! a bare VDI needs a VM created and the disk attached by hand.
//!
//! The descriptor comes first in the archive, as the OVF specification requires, so
//! an importer can read it before the disk while streaming the file.

use crate::host::Cmd;
use std::fmt::Write as _;
use std::path::Path;

/// The virtual machine the descriptor asks for.
#[derive(Debug, Clone)]
pub struct Appliance {
    /// Name of the virtual system (the image's file stem).
    pub name: String,
    /// Virtual size of the disk in bytes.
    pub capacity: u64,
    /// File name of the VMDK inside the archive.
    pub disk_file: String,
    /// Size of that VMDK file in bytes.
    pub disk_file_size: u64,
    pub cpus: u32,
    pub memory_mib: u32,
    /// One network adapter per entry, attached to the network of that name
    /// (`NAT`, `HostOnly`).
    pub networks: Vec<&'static str>,
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// One `<Item>` of the hardware section; CIM wants its elements in alphabetical order,
/// which is the order of `fields`.
fn item(out: &mut String, fields: &[(&str, String)]) {
    out.push_str("      <Item>\n");
    for (k, v) in fields {
        let _ = writeln!(out, "        <rasd:{k}>{}</rasd:{k}>", xml_escape(v));
    }
    out.push_str("      </Item>\n");
}

/// The OVF 1.0 descriptor: one virtual system with a SATA (AHCI) disk and E1000 NICs.
pub fn descriptor(a: &Appliance) -> String {
    let name = xml_escape(&a.name);
    let mut x = String::new();
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str(
        "<Envelope ovf:version=\"1.0\" xml:lang=\"en-US\" \
         xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\" \
         xmlns:rasd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData\" \
         xmlns:vssd=\"http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n",
    );
    let _ = write!(
        x,
        "  <References>\n    <File ovf:id=\"file1\" ovf:href=\"{}\" ovf:size=\"{}\"/>\n  </References>\n",
        xml_escape(&a.disk_file),
        a.disk_file_size
    );
    let _ = write!(
        x,
        "  <DiskSection>\n    <Info>Virtual disks</Info>\n    <Disk ovf:diskId=\"vmdisk1\" \
         ovf:fileRef=\"file1\" ovf:capacity=\"{}\" ovf:capacityAllocationUnits=\"byte\" \
         ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n  </DiskSection>\n",
        a.capacity
    );
    x.push_str("  <NetworkSection>\n    <Info>Logical networks</Info>\n");
    let mut seen: Vec<&str> = Vec::new();
    for n in &a.networks {
        if !seen.contains(n) {
            seen.push(n);
            let _ = writeln!(
                x,
                "    <Network ovf:name=\"{n}\">\n      <Description>The {n} network</Description>\n    </Network>"
            );
        }
    }
    x.push_str("  </NetworkSection>\n");
    let _ = write!(
        x,
        "  <VirtualSystem ovf:id=\"{name}\">\n    <Info>A ConPaaS virtual machine built by mkimage</Info>\n    \
         <OperatingSystemSection ovf:id=\"96\">\n      <Info>The guest operating system</Info>\n      \
         <Description>Debian_64</Description>\n    </OperatingSystemSection>\n    \
         <VirtualHardwareSection>\n      <Info>Virtual hardware requirements</Info>\n      <System>\n        \
         <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n        \
         <vssd:InstanceID>0</vssd:InstanceID>\n        \
         <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>\n        \
         <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>\n      </System>\n"
    );
    item(
        &mut x,
        &[
            ("AllocationUnits", "hertz * 10^6".into()),
            ("Caption", format!("{} virtual CPU", a.cpus)),
            ("Description", "Number of virtual CPUs".into()),
            ("ElementName", format!("{} virtual CPU", a.cpus)),
            ("InstanceID", "1".into()),
            ("ResourceType", "3".into()),
            ("VirtualQuantity", a.cpus.to_string()),
        ],
    );
    item(
        &mut x,
        &[
            ("AllocationUnits", "MegaBytes".into()),
            ("Caption", format!("{} MB of memory", a.memory_mib)),
            ("Description", "Memory Size".into()),
            ("ElementName", format!("{} MB of memory", a.memory_mib)),
            ("InstanceID", "2".into()),
            ("ResourceType", "4".into()),
            ("VirtualQuantity", a.memory_mib.to_string()),
        ],
    );
    item(
        &mut x,
        &[
            ("Address", "0".into()),
            ("Caption", "sataController0".into()),
            ("Description", "SATA Controller".into()),
            ("ElementName", "sataController0".into()),
            ("InstanceID", "3".into()),
            ("ResourceSubType", "AHCI".into()),
            ("ResourceType", "20".into()),
        ],
    );
    item(
        &mut x,
        &[
            ("AddressOnParent", "0".into()),
            ("Caption", "disk1".into()),
            ("Description", "Disk Image".into()),
            ("ElementName", "disk1".into()),
            ("HostResource", "/disk/vmdisk1".into()),
            ("InstanceID", "4".into()),
            ("Parent", "3".into()),
            ("ResourceType", "17".into()),
        ],
    );
    for (i, n) in a.networks.iter().enumerate() {
        item(
            &mut x,
            &[
                ("AutomaticAllocation", "true".into()),
                ("Caption", format!("Ethernet adapter on '{n}'")),
                ("Connection", n.to_string()),
                ("ElementName", format!("Ethernet adapter on '{n}'")),
                ("InstanceID", (5 + i).to_string()),
                ("ResourceSubType", "E1000".into()),
                ("ResourceType", "10".into()),
            ],
        );
    }
    x.push_str("    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n");
    x
}

/// Writes `out` (an .ova) for the raw disk image `raw`; the files inside are named
/// after `stem` (`out` may be a temporary name). `networks`: see [`Appliance`]. The
/// VMDK and descriptor are made in a directory under `scratch` (the build's work
/// directory, which the crash journal covers), removed on return.
pub fn write(
    raw: &Path,
    out: &Path,
    stem: &str,
    networks: Vec<&'static str>,
    scratch: &Path,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ova-")
        .tempdir_in(scratch)?;
    let disk_file = format!("{stem}-disk1.vmdk");
    let vmdk = dir.path().join(&disk_file);
    Cmd::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk"])
        .args(["-o", "subformat=streamOptimized"])
        .arg(raw)
        .arg(&vmdk)
        .run()?;
    let appliance = Appliance {
        name: stem.to_owned(),
        capacity: std::fs::metadata(raw)?.len(),
        disk_file: disk_file.clone(),
        disk_file_size: std::fs::metadata(&vmdk)?.len(),
        cpus: 1,
        memory_mib: 1024,
        networks,
    };
    let ovf_file = format!("{stem}.ovf");
    std::fs::write(dir.path().join(&ovf_file), descriptor(&appliance))?;
    let mf_file = format!("{stem}.mf");
    let mut mf = String::new();
    for f in [&ovf_file, &disk_file] {
        let _ = writeln!(
            mf,
            "SHA256({f})= {}",
            crate::verify::sha256_file(&dir.path().join(f))?
        );
    }
    std::fs::write(dir.path().join(&mf_file), mf)?;
    Cmd::new("tar")
        .args([
            "--format=ustar",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-cf",
        ])
        .arg(out)
        .arg("-C")
        .arg(dir.path())
        .args([&ovf_file, &disk_file, &mf_file])
        .run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(networks: Vec<&'static str>) -> Appliance {
        Appliance {
            name: "conpaas & co".into(),
            capacity: 2 << 30,
            disk_file: "conpaas-disk1.vmdk".into(),
            disk_file_size: 12345,
            cpus: 1,
            memory_mib: 1024,
            networks,
        }
    }

    #[test]
    fn descriptor_names_the_disk_its_capacity_and_one_nic_per_network() {
        let d = descriptor(&sample(vec!["NAT", "HostOnly"]));
        assert!(d.contains("ovf:href=\"conpaas-disk1.vmdk\" ovf:size=\"12345\""));
        assert!(d.contains("ovf:capacity=\"2147483648\" ovf:capacityAllocationUnits=\"byte\""));
        assert!(d.contains("vmdk.html#streamOptimized"));
        assert!(d.contains("<rasd:HostResource>/disk/vmdisk1</rasd:HostResource>"));
        assert_eq!(
            d.matches("<rasd:ResourceType>10</rasd:ResourceType>")
                .count(),
            2
        );
        assert!(d.contains("<rasd:Connection>HostOnly</rasd:Connection>"));
        // The name is escaped wherever it appears.
        assert!(d.contains("ovf:id=\"conpaas &amp; co\""));
        assert!(!d.contains("conpaas & co"));
        // Every element that opens is closed.
        assert_eq!(d.matches("<Item>").count(), d.matches("</Item>").count());
        assert_eq!(d.matches("<Item>").count(), 6);
    }

    #[test]
    fn a_network_named_twice_is_declared_once() {
        let d = descriptor(&sample(vec!["NAT", "NAT"]));
        assert_eq!(d.matches("<Network ovf:name=\"NAT\">").count(), 1);
        assert_eq!(
            d.matches("<rasd:Connection>NAT</rasd:Connection>").count(),
            2
        );
    }
}
