FROM scratch
COPY {{GIT}}/repo.git /r
