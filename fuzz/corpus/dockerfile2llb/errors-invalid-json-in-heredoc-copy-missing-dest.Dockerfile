FROM busybox
COPY <<EOF
x
EOF
