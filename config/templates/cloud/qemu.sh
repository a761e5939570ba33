# cloud: qemu (user networking; the guest sees itself as 10.0.2.15)
IP_PUBLIC=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n1)
PRIVATE_IP=$IP_PUBLIC
