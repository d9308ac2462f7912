FROM busybox
ENV X=val
COPY <<"EOF" /q.txt
$X
EOF
COPY <<'EOF' /s.txt
${X}
EOF
COPY <<EOF /u.txt
$X
EOF
