FROM scratch
ARG NAME=world
COPY <<"EOF" /raw
hello $NAME
EOF
