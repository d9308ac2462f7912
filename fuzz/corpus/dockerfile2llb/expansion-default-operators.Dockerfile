FROM busybox
ENV E=""
ENV U=${UNSET:-def} F=${E:-def2} G=${E-def3} H=${UNSET-def4}
