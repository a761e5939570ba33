# cloud: ec2 (instance metadata; IMDSv2 session token, plain IMDSv1 GETs when no token is given)
MD=http://169.254.169.254/latest/meta-data
MD_TOKEN=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token || true)
md() {
  if [ -n "$MD_TOKEN" ]; then curl -fsS -H "X-aws-ec2-metadata-token: $MD_TOKEN" "$MD/$1"; else curl -fsS "$MD/$1"; fi
}
IP_PUBLIC=$(md public-ipv4 || md local-ipv4)
PRIVATE_IP=$(md local-ipv4)
VM_ID=$(md instance-id)
PUBLIC_HOSTNAME=$(md public-hostname || hostname)
echo "$PUBLIC_HOSTNAME" > /etc/hostname
hostname "$PUBLIC_HOSTNAME"
