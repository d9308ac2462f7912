FROM busybox
ENV A=inner
ENV B=${UNSET:-${A}}
