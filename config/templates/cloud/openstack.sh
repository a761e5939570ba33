# cloud: openstack (EC2-compatible metadata; keeps the cloud's DNS servers)
MD=http://169.254.169.254/latest/meta-data
PRIVATE_IP=$(curl -fsS $MD/local-ipv4)
IP_PUBLIC=$(curl -fsS $MD/public-ipv4 || echo "$PRIVATE_IP")
[ -n "$IP_PUBLIC" ] || IP_PUBLIC=$PRIVATE_IP
VM_ID=$(curl -fsS $MD/instance-id)
