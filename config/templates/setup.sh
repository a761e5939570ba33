# setup: directories and the CA certificate (public; no private key travels in user-data)
ROOT_DIR=/root
CPS_HOME=/root/ConPaaS
LOG_FILE=/var/log/cps{{ role }}.log
ETC=/etc/cps{{ role }}
CERT_DIR=$ETC/certs
VAR_TMP=/var/tmp/cps{{ role }}
VAR_CACHE=/var/cache/cps{{ role }}
VAR_RUN=/var/run/cps{{ role }}
mkdir -p $ETC $CERT_DIR $VAR_TMP $VAR_CACHE $VAR_RUN $CPS_HOME
chmod 700 $CERT_DIR
cat <<'CA_EOF' > $CERT_DIR/ca_cert.pem
{{ ca_cert_pem | trim }}
CA_EOF
