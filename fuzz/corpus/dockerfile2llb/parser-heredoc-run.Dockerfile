FROM busybox
RUN <<EOF
echo one > /one
echo two > /two
EOF
