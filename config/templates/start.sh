# start: enrol (key generated here, certificate signed through the one-time token), then run
CPS=${CPS:-/usr/local/bin/cps}
$CPS enroll --url '{{ enroll_url }}' --token '{{ token }}' --node-id '{{ node_id }}' --cert-dir $CERT_DIR \
  >>$ROOT_DIR/{{ role }}.out 2>>$ROOT_DIR/{{ role }}.err || exit 1
nohup $CPS {{ role }} -c $ROOT_DIR/config.cfg >>$ROOT_DIR/{{ role }}.out 2>>$ROOT_DIR/{{ role }}.err &
echo $! > $ROOT_DIR/{{ role }}.pid
