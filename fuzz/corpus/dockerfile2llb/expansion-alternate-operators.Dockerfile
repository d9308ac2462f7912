FROM busybox
ENV A=1 E=""
ENV P=${A:+yes} Q=${E:+yes} R=${E+yes} S=${UNSET+yes}
