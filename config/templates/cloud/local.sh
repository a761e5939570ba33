# cloud: local (nothing to discover)
IP_PUBLIC=127.0.0.1
PRIVATE_IP=127.0.0.1
