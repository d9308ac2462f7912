FROM busybox
RUN cat <<EOF > /cat.txt
hello
world
EOF
