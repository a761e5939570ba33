# cloud: ec2 (instance metadata)
MD=http://169.254.169.254/latest/meta-data
IP_PUBLIC=$(curl -fsS $MD/public-ipv4 || curl -fsS $MD/local-ipv4)
PRIVATE_IP=$(curl -fsS $MD/local-ipv4)
VM_ID=$(curl -fsS $MD/instance-id)
PUBLIC_HOSTNAME=$(curl -fsS $MD/public-hostname || hostname)
echo "$PUBLIC_HOSTNAME" > /etc/hostname
hostname "$PUBLIC_HOSTNAME"
