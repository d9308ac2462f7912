FROM busybox
ADD --chown=1000:1000 --chmod=0640 {{GIT}}/repo.git#main:sub /r
